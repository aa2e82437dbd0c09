"""llama.cpp adapter: run GGUF files through llama-cpp-python (`python llamacpp_run.py FOLDER`).

The models are .gguf files llamapro converted with the converter of the same llama.cpp source. Three
passes per model: the whole sequence in one batch (n_batch = n_ubatch >= tokens, logits for every
position), the prefill then one-token `eval` steps through llama.cpp's KV cache, and greedy tokens after
the whole sequence. Logits are llama.cpp's float32 output.

Must not: import llamapro; tokenize (token ids come from llamapro).
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or __package__:
    from llamapro_cli.verify.engines.adapters import adapter_io
else:  # run by path in the engine's interpreter, where llamapro is not installed
    import adapter_io


def versions() -> dict[str, str]:
    importlib.import_module("llama_cpp")
    return adapter_io.dist_versions("llama_cpp_python", "gguf", "numpy")


# ggml types of the KV cache per dtype: llama.cpp's default cache is f16 whatever the weights, which
# rounds every key and value (~1e-3 relative) and would hide an f32 model behind f16 noise.
KV_TYPES = {"float32": 0, "float16": 1, "bfloat16": 30}  # GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16


def context_args(request: adapter_io.Request) -> dict[str, Any]:
    """Llama() arguments: one batch holds the whole sequence, so the full pass is one forward."""
    tokens = len(request.ids)
    return {
        "type_k": KV_TYPES[request.dtype],
        "type_v": KV_TYPES[request.dtype],
        "n_ctx": tokens + request.decode_steps + 8,
        "n_batch": tokens,
        "n_ubatch": tokens,
        "n_threads": request.threads,
        "n_threads_batch": request.threads,
        "n_gpu_layers": -1 if request.device == "cuda" else 0,
        "logits_all": True,
        "seed": 0,
        "verbose": bool(request.options.get("verbose", False)),
    }


def load(request: adapter_io.Request, path: str) -> Any:
    llama_cpp: Any = importlib.import_module("llama_cpp")
    llm = llama_cpp.Llama(model_path=path, **context_args(request))
    vocab = int(llm.n_vocab())
    beyond = [t for t in request.ids if not 0 <= t < vocab]
    if beyond:
        raise ValueError(
            f"token id {beyond[0]} is beyond the GGUF's vocabulary of {vocab} tokens (the converter sizes "
            "it from the tokenizer); use --prompt, or --tokens with a model whose tokenizer covers vocab_size"
        )
    return llm


def run(request: adapter_io.Request, llm: Any) -> adapter_io.Passes:
    np: Any = importlib.import_module("numpy")
    ids = list(request.ids)

    def scores(fed: list[int]) -> Any:
        start = llm.n_tokens
        llm.eval(fed)
        return np.array(llm.scores[start : llm.n_tokens], dtype=np.float32)

    llm.reset()
    full = scores(ids)
    llm.reset()
    pieces = [scores(ids[: request.prefill])]
    pieces += [scores([t]) for t in ids[request.prefill :]]
    cached = np.concatenate(pieces, axis=0)
    llm.reset()
    last = scores(ids)[-1]
    greedy = []
    for step in range(request.decode_steps):
        token = int(last.argmax())
        greedy.append(token)
        if step + 1 < request.decode_steps:
            last = scores([token])[-1]
    return adapter_io.Passes(full, cached, np.array(greedy, dtype=np.int64), {"kind": "logits"})


if __name__ == "__main__":
    sys.exit(adapter_io.main(sys.argv[1:], versions, load, run))
