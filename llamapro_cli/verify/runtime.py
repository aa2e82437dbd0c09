"""Where and how a numerical run happens, shared by `verify-identity` and `compare`: the engine `auto`
stands for, whether it can run these checkpoints, the device, the dtype, and the peak-memory figures
every report carries.

Invariant: a choice that cannot run here is refused before any weight is read (`InputError` when
something is missing on this machine, `UnsupportedError` when the engine cannot run the family).
Must not: import torch or transformers at module level; print.
"""

from __future__ import annotations

import importlib.util
import resource
import sys
from collections import Counter

from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.errors import InputError, UnsupportedError
from llamapro_cli.verify.options import Device, Engine

FLOAT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def planned_engine(choice: Engine) -> Engine:
    """The engine `auto` stands for here (availability is checked by `pick_engine`)."""
    if choice is not Engine.AUTO:
        return choice
    return Engine.TRANSFORMERS if importlib.util.find_spec("transformers") is not None else Engine.NATIVE


def pick_engine(choice: Engine, *checkpoints: Checkpoint) -> Engine:
    """The engine that will run, refused when it is missing or cannot run one of `checkpoints`."""
    has_hf = importlib.util.find_spec("transformers") is not None
    choice = planned_engine(choice)
    if choice is Engine.TRANSFORMERS and not has_hf:
        raise InputError(
            "--engine transformers needs the transformers package",
            hint="pip install 'llamapro-cli[hf]', or use --engine native",
        )
    if choice is Engine.NATIVE:
        from llamapro_cli.verify.spec import SUPPORTED_FAMILIES

        for ckpt in checkpoints:
            if ckpt.family.name not in SUPPORTED_FAMILIES:
                raise UnsupportedError(
                    f"the native engine does not support {ckpt.family.name} models",
                    hint="use --engine transformers (pip install 'llamapro-cli[hf]')",
                )
    return choice


def pick_device(choice: Device) -> str:
    import torch

    if choice is Device.AUTO:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice is Device.CUDA and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available here", hint="use --device cpu")
    return choice.value


def auto_dtype(exp: Checkpoint) -> str:
    """The config's dtype when it names one we run, else the dtype holding most parameters."""
    for config in (exp.family.sub_config(exp.config), exp.config):
        for key in ("dtype", "torch_dtype"):
            if config.get(key) in FLOAT_DTYPES.values():
                return str(config[key])
    counts: Counter[str] = Counter()
    for name in exp.weight_map:
        info = exp.info(name)
        if info.dtype in FLOAT_DTYPES:
            counts[FLOAT_DTYPES[info.dtype]] += info.numel
    if not counts:
        raise InputError(f"{exp.root}: no float32/bfloat16/float16 weights to run", hint="pass --dtype")
    return counts.most_common(1)[0][0]


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def peak_gpu_bytes(device: str | None) -> int | None:
    if device != "cuda":
        return None
    import torch

    return int(torch.cuda.max_memory_allocated())
