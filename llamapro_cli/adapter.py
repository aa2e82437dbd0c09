"""A PEFT LoRA adapter folder, read and judged before anything is merged.

`read_adapter(folder)` reads `adapter_config.json` (bounded, JSON only) and the header of
`adapter_model.safetensors`, hashes the weights file, and returns an `Adapter`: every LoRA pair (the
module it adapts, the `lora_A`/`lora_B` tensors, DoRA's magnitude vector, its scaling) and every full
tensor the adapter replaces (`modules_to_save`, trained biases). Names are the adapter's own in-memory
module names with PEFT's `base_model.model.` wrapper removed; `merge.py` maps them to checkpoint keys.

What llamapro reproduces exactly is PEFT 0.21's `merge_and_unload()` for plain LoRA, rsLoRA and DoRA on
linear layers (`peft/tuners/lora/layer.py::Linear.merge`, `get_delta_weight`, `variants.py::
DoraLinearVariant.merge_unsafe`). Everything else is refused here (`UnsupportedError`, exit 3) with the
config key that asks for it: other PEFT methods, `fan_in_fan_out`, `lora_bias`, embedding or conv LoRA,
`target_parameters`, trainable tokens, initialisations that rewrite the base weights (PiSSA, OLoRA,
CorDA, LoftQ, LoRA-GA), the newer LoRA variants, and any config key this module does not know that is
set to something other than its off value.

Invariant: nothing in the folder is executed or unpickled; tensor data is not read (only hashed).
Must not: import torch; write anything.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamapro_cli.errors import InputError, UnsupportedError
from llamapro_cli.io.header import Header, TensorInfo, read_header
from llamapro_cli.io.ranges import read_chunks

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WRAPPER = "base_model.model."  # PEFT's PeftModel -> LoraModel -> the model, in saved keys
MAX_CONFIG_SIZE = 16 * 1024 * 1024
# Config keys that only say how the adapter was found or trained: the weights file says what to merge.
_INERT = frozenset(
    {
        "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
        "inference_mode", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
        "layers_to_transform", "layers_pattern", "modules_to_save", "rank_pattern", "alpha_pattern",
        "use_rslora", "use_dora", "layer_replication", "init_lora_weights", "bias", "megatron_core",
        "qalora_group_size", "eva_config", "runtime_config",
    }
)  # fmt: skip
# Initialisations that leave the base weights alone (the others rewrite them: the adapter then belongs
# to a different base, and PEFT needs `path_initial_model_for_weight_conversion` to undo that).
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")


@dataclass(frozen=True)
class LoraPair:
    """One adapted linear module: W' = W + (B @ A) * scaling (DoRA: rescaled row-wise by its magnitude)."""

    module: str  # in-memory module name, e.g. model.layers.4.self_attn.q_proj
    a: TensorInfo  # lora_A.weight, (r, in)
    b: TensorInfo  # lora_B.weight, (out, r)
    magnitude: TensorInfo | None  # DoRA's lora_magnitude_vector, (out,)
    scaling: float  # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora, exactly as PEFT computes it


@dataclass(frozen=True)
class Adapter:
    """A readable, mergeable PEFT LoRA adapter."""

    root: Path
    weights: Path
    header: Header
    config: Mapping[str, Any]
    config_sha256: str
    weights_sha256: str
    pairs: tuple[LoraPair, ...]
    replaced: Mapping[str, TensorInfo]  # in-memory parameter name -> full tensor saved in the adapter
    layer_replication: tuple[tuple[int, int], ...] | None
    use_dora: bool
    use_rslora: bool

    def record(self) -> dict[str, Any]:
        """What the merged model's provenance says about this adapter (JSON types)."""
        return {
            "kind": "peft-lora",
            "path": str(self.root),
            "weights_sha256": self.weights_sha256,
            "config_sha256": self.config_sha256,
            "peft_version": _str_or_none(self.config.get("peft_version")),
            "base_model_name_or_path": _str_or_none(self.config.get("base_model_name_or_path")),
            "r": self.config.get("r"),
            "lora_alpha": self.config.get("lora_alpha"),
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "layer_replication": [list(r) for r in self.layer_replication]
            if self.layer_replication
            else None,
        }


def read_adapter(folder: str | Path) -> Adapter:
    """Read and judge a PEFT adapter folder; `InputError`/`UnsupportedError` (exit 3) say what is wrong."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise InputError(f"--adapter {root}: no such folder")
    config, config_sha = _read_config(root / CONFIG_NAME)
    weights = root / WEIGHTS_NAME
    if not weights.is_file():
        pickled = [p.name for p in root.glob("adapter_model*.bin")]
        raise InputError(
            f"{root}: no {WEIGHTS_NAME}" + (f" (only {', '.join(pickled)})" if pickled else ""),
            hint="llamapro never unpickles files: save it with save_pretrained(safe_serialization=True)"
            if pickled
            else "point --adapter at the folder PEFT's save_pretrained wrote",
        )
    _refuse_unsupported(config, root / CONFIG_NAME)
    header = read_header(weights)
    use_rslora = config.get("use_rslora") is True
    pairs, replaced = _entries(header, config, use_rslora, weights)
    return Adapter(
        root=root.resolve(),
        weights=weights,
        header=header,
        config=config,
        config_sha256=config_sha,
        weights_sha256=file_sha256(weights),
        pairs=pairs,
        replaced=replaced,
        layer_replication=_layer_replication(config.get("layer_replication"), root / CONFIG_NAME),
        use_dora=config.get("use_dora") is True,
        use_rslora=use_rslora,
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    for chunk in read_chunks(path, 0, path.stat().st_size):
        digest.update(chunk)
    return digest.hexdigest()


def _read_config(path: Path) -> tuple[dict[str, Any], str]:
    if not path.is_file():
        raise InputError(f"{path}: missing or not a regular file", hint="is this a PEFT adapter folder?")
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_SIZE + 1)
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror})") from None
    if len(raw) > MAX_CONFIG_SIZE:
        raise InputError(f"{path}: larger than {MAX_CONFIG_SIZE} bytes")
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise InputError(f"{path}: not valid JSON ({str(e).splitlines()[0] if str(e) else e})") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: not a JSON object")
    return config, hashlib.sha256(raw).hexdigest()


def _refuse_unsupported(config: Mapping[str, Any], where: Path) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise UnsupportedError(f"{where}: peft_type {peft_type!r}; llamapro merges LoRA adapters only")
    refusals = {
        "fan_in_fan_out": "Conv1D (GPT-2-style) weights",
        "lora_bias": "LoRA biases",
        "target_parameters": "LoRA on bare parameters (MoE experts)",
        "trainable_token_indices": "trainable tokens",
        "ensure_weight_tying": "tied adapter weights",
    }
    for key, what in refusals.items():
        if _is_set(config.get(key)):
            raise UnsupportedError(f"{where}: {key} is set; llamapro does not merge {what} (PEFT does)")
    init = config.get("init_lora_weights", True)
    if not any(init is v if isinstance(v, bool) else init == v for v in _PLAIN_INITS):
        raise UnsupportedError(
            f"{where}: init_lora_weights is {init!r}, which rewrites the base weights at initialisation",
            hint="convert it first: PEFT save_pretrained(path_initial_model_for_weight_conversion=...)",
        )
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise UnsupportedError(f"{where}: bias is {config.get('bias')!r} (expected none, all or lora_only)")
    unknown = sorted(k for k, v in config.items() if k not in _INERT and k not in refusals and _is_set(v))
    if unknown:
        raise UnsupportedError(
            f"{where}: {', '.join(unknown)} set; llamapro does not know how PEFT merges that",
            hint="merge with PEFT itself (merge_and_unload), or remove the key if it is not in effect",
        )


def _is_set(value: Any) -> bool:
    """Whether a config value asks for something: anything but null, false, an empty list or object."""
    return value not in (None, False, "", [], {}) and value != 0


def _entries(
    header: Header, config: Mapping[str, Any], rslora: bool, where: Path
) -> tuple[tuple[LoraPair, ...], dict[str, TensorInfo]]:
    parts: dict[str, dict[str, TensorInfo]] = {}
    replaced: dict[str, TensorInfo] = {}
    for key, info in header.tensors.items():
        if not key.startswith(WRAPPER):
            raise InputError(f"{where}: tensor {key} is not under {WRAPPER!r}; not a PEFT-saved adapter")
        name = key[len(WRAPPER) :]
        m = _LORA_KEY.match(name)
        if m:
            parts.setdefault(m.group("module"), {})[m.group("part")] = info
        elif ".lora_" in name or name.startswith("lora_"):
            raise UnsupportedError(f"{where}: tensor {key}: only linear LoRA (lora_A/lora_B) is merged")
        else:
            replaced[name] = info
    pairs = tuple(_pair(module, found, config, rslora, where) for module, found in parts.items())
    dora = config.get("use_dora") is True
    for pair in pairs:
        if (pair.magnitude is not None) != dora:
            state = "has" if pair.magnitude is not None else "lacks"
            raise InputError(f"{where}: {pair.module} {state} a DoRA magnitude but use_dora is {dora}")
    return pairs, replaced


def _pair(
    module: str, found: Mapping[str, TensorInfo], config: Mapping[str, Any], rslora: bool, where: Path
) -> LoraPair:
    a, b = found.get("lora_A.weight"), found.get("lora_B.weight")
    if a is None or b is None:
        raise InputError(f"{where}: {module} has only one of lora_A / lora_B")
    magnitude = found.get("lora_magnitude_vector")
    for info in (a, b, magnitude):
        if info is not None and info.dtype not in ("F32", "F16", "BF16", "F64"):
            raise UnsupportedError(f"{where}: {info.name} is {info.dtype}; expected a float dtype")
    r = a.shape[0] if len(a.shape) == 2 else -1
    if len(a.shape) != 2 or b.shape[1:] != (r,) or len(b.shape) != 2 or r < 1:
        raise UnsupportedError(
            f"{where}: {module}: lora_A {list(a.shape)} / lora_B {list(b.shape)} are not a linear layer's"
        )
    if magnitude is not None and magnitude.shape != (b.shape[0],):
        raise InputError(
            f"{where}: {module}: magnitude {list(magnitude.shape)} does not fit {b.shape[0]} rows"
        )
    expected_r = _pattern_value(config.get("rank_pattern"), module, config.get("r"))
    if expected_r is not None and expected_r != r:
        raise InputError(f"{where}: {module} has rank {r} but the config says r={expected_r}")
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise InputError(f"{where}: lora_alpha for {module} is {alpha!r}, not a number")
    # The very expressions of LoraLayer.update_layer: a Python float, rounded the same way.
    scaling = alpha / math.sqrt(r) if rslora else alpha / r
    return LoraPair(module, a, b, magnitude, scaling)


def _pattern_value(patterns: Any, module: str, default: Any) -> Any:
    """PEFT's `get_pattern_key` (peft/utils/other.py): the first key `k` with `(.*\\.)?(k)$` matching."""
    if not patterns:
        return default
    if not isinstance(patterns, dict):
        raise InputError(f"rank_pattern/alpha_pattern is {type(patterns).__name__}, not an object")
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error:
            raise InputError(f"rank_pattern/alpha_pattern key {key!r} is not a valid regex") from None
    return default


def _layer_replication(value: Any, where: Path) -> tuple[tuple[int, int], ...] | None:
    if value is None:
        return None
    ok = (
        isinstance(value, list)
        and value
        and all(
            isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r) and 0 <= r[0] < r[1]
            for r in value
        )
    )
    if not ok:
        raise InputError(f"{where}: layer_replication is not a list of [start, end) layer ranges")
    return tuple((r[0], r[1]) for r in value)


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
