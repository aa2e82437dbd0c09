"""MLX adapter: run checkpoints through mlx-lm's own modelling code (`python mlx_run.py FOLDER`).

Three passes per model, as in llamapro's transformers engine: a full forward (one call, no cache), the
same ids as a prefill then one-token steps through mlx-lm's prompt cache, and greedy tokens after the
whole sequence. mlx-lm loads a Hugging Face folder directly (its own reading of config.json); weights
are cast to the requested dtype, logits returned as float32 (exact for bf16/f16 values).

Must not: import llamapro; load a tokenizer (token ids come from llamapro).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING or __package__:
    from llamapro_cli.verify.engines.adapters import adapter_io
else:  # run by path in the engine's interpreter, where llamapro is not installed
    import adapter_io

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def versions() -> dict[str, str]:
    importlib.import_module("mlx.core")
    importlib.import_module("mlx_lm")
    return adapter_io.dist_versions("mlx", "mlx-lm", "mlx-cpu", "mlx-metal")


def load(request: adapter_io.Request, path: str) -> Any:
    mx: Any = importlib.import_module("mlx.core")
    utils: Any = importlib.import_module("mlx_lm.utils")
    if request.device == "cpu":  # otherwise MLX's default: Metal on a Mac, the CPU with mlx[cpu]
        mx.set_default_device(mx.cpu)
    loaded = utils.load_model(Path(path), lazy=True)
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    model.set_dtype(getattr(mx, DTYPES[request.dtype]))
    mx.eval(model.parameters())
    return model


def run(request: adapter_io.Request, model: Any) -> adapter_io.Passes:
    mx: Any = importlib.import_module("mlx.core")
    cache_module: Any = importlib.import_module("mlx_lm.models.cache")
    np: Any = importlib.import_module("numpy")
    ids = mx.array([request.ids])

    def logits(x: Any, cache: Any = None) -> Any:
        out = model(x, cache=cache)
        return np.array(out[0].astype(mx.float32))

    full = logits(ids)
    cache = cache_module.make_prompt_cache(model)
    pieces = [logits(ids[:, : request.prefill], cache)]
    for t in range(request.prefill, len(request.ids)):
        pieces.append(logits(ids[:, t : t + 1], cache))
    cached = np.concatenate(pieces, axis=0)
    cache = cache_module.make_prompt_cache(model)
    last = logits(ids, cache)[-1]
    greedy = []
    for step in range(request.decode_steps):
        token = int(last.argmax())
        greedy.append(token)
        if step + 1 < request.decode_steps:
            last = logits(mx.array([[token]]), cache)[-1]
    return adapter_io.Passes(full, cached, np.array(greedy, dtype=np.int64), {"kind": "logits"})


if __name__ == "__main__":
    sys.exit(adapter_io.main(sys.argv[1:], versions, load, run))
