"""Reading a trained checkpoint as bare safetensors files, whatever the trainer saved.

Trainers often save weights without config.json or llamapro.json, re-shard them, prefix their names
(`base_model.model.`, `_orig_mod.`, `module.`) and upcast trainable tensors. `trained_files()` finds the
files (an index, `model.safetensors`, or every `*.safetensors` in the folder) and `open_trained()` reads
their headers and names each tensor by the freeze map's checkpoint key (after stripping those prefixes,
or through its in-memory parameter name).

Invariant: only headers are read here; two trained tensors never stand for the same map key.
Must not: read tensor data, print, write anything.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from llamapro_cli.errors import InputError
from llamapro_cli.freeze.map import FreezeMap, TensorEntry
from llamapro_cli.io.files import INDEX_NAME, SINGLE_NAME, read_json
from llamapro_cli.io.header import TensorInfo, read_header

# Wrappers trainers put in front of parameter names when saving a state dict.
WRAPPER_PREFIXES = ("base_model.model.", "_orig_mod.", "module.")
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's save_pretrained of an adapter (peft/utils/constants.py)
LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector")


class AdapterError(InputError):
    """A PEFT adapter where the trained model's weights were expected: it holds only LoRA matrices, and
    the frozen tensors are not in it at all."""

    def __init__(self, path: Path) -> None:
        folder = path if path.is_dir() else path.parent
        merged = folder.with_name(folder.name + "-merged")
        code = (
            "from peft import AutoPeftModelForCausalLM; "
            f"AutoPeftModelForCausalLM.from_pretrained({str(folder)!r}).merge_and_unload()"
            f".save_pretrained({str(merged)!r})"
        )
        super().__init__(
            f"{path}: a PEFT adapter (LoRA weights only), not the trained model: merge it first",
            hint=f"python -c {shlex.quote(code)} && llamapro verify-frozen ... --trained "
            f"{shlex.quote(str(merged))}",
        )


@dataclass(frozen=True)
class TrainedTensor:
    key: str  # the name as stored in the trained checkpoint
    path: Path
    offset: int  # absolute file offset of its data
    info: TensorInfo


def open_trained(
    path: Path, fm: FreezeMap, *, heads: Mapping[str, str] | None = None
) -> tuple[int, dict[str, TrainedTensor], list[str], list[str]]:
    """(file count, {checkpoint key: tensor}, prefixes stripped, names the map does not know); `heads`
    (a tied map's unstored head keys) are known names too."""
    files = trained_files(path)
    by_param = _single_key_parameters(fm.tensors)
    known: Mapping[str, object] = {**fm.tensors, **(heads or {})}
    found: dict[str, TrainedTensor] = {}
    stripped: set[str] = set()
    extra: list[str] = []
    for file in files:
        header = read_header(file)
        for raw, info in header.tensors.items():
            name, prefix = _canonical(raw, known, by_param)
            if name is None:
                extra.append(raw)
                continue
            if name in found:
                raise InputError(f"{path}: tensors {found[name].key} and {raw} both stand for {name}")
            if prefix:
                stripped.add(prefix)
            found[name] = TrainedTensor(raw, file, header.absolute_range(raw)[0], info)
    if not found and any(is_lora(raw) for raw in extra):
        raise AdapterError(path)  # an adapter file by another name: nothing to compare, everything "missing"
    return len(files), found, sorted(stripped), extra


def is_lora(name: str) -> bool:
    """Whether a trained tensor is a PEFT LoRA matrix (or DoRA magnitude) rather than a model weight."""
    return any(marker in name for marker in LORA_MARKERS)


def lora_target(name: str) -> str:
    """The weight a LoRA tensor adapts, as a checkpoint key: `base_model.model.X.lora_A.default.weight`
    -> `X.weight` (wrapper prefixes stripped)."""
    while (strip := next((p for p in WRAPPER_PREFIXES if name.startswith(p)), None)) is not None:
        name = name[len(strip) :]
    module = name
    for marker in LORA_MARKERS:
        module = module.split(marker, 1)[0]
    return f"{module}.weight"


def _single_key_parameters(tensors: Mapping[str, TensorEntry]) -> dict[str, str]:
    """In-memory name -> checkpoint key, for parameters loaded from exactly one key."""
    keys: dict[str, list[str]] = {}
    for key, entry in tensors.items():
        if entry.parameter is not None:
            keys.setdefault(entry.parameter, []).append(key)
    return {param: ks[0] for param, ks in keys.items() if len(ks) == 1}


def _canonical(
    raw: str, tensors: Mapping[str, object], by_param: Mapping[str, str]
) -> tuple[str | None, str]:
    name, prefix = raw, ""
    while True:
        if name in tensors:
            return name, prefix
        if name in by_param:  # saved under its in-memory name (a raw state_dict)
            return by_param[name], prefix
        strip = next((p for p in WRAPPER_PREFIXES if name.startswith(p)), None)
        if strip is None:
            return None, prefix
        name, prefix = name[len(strip) :], prefix + strip


def trained_files(path: Path) -> list[Path]:
    """The safetensors files a trained checkpoint's weights are in, as transformers would load them.

    A `.safetensors` file (or a `.safetensors.index.json`) is taken as given. A folder is resolved as
    transformers 5.x `modeling_utils._get_resolved_checkpoint_files` does: config.json's
    `transformers_weights` when set, else `model.safetensors`, else `model.safetensors.index.json`; when
    more than one of those exists the folder is ambiguous (transformers takes one, other loaders the
    other, and one is stale) and refused. A folder with none of them is a bare state dict: every
    `*.safetensors` in it, unless it is a PEFT adapter (merge it first).
    """
    if path.is_file():
        if path.name.endswith(".safetensors.index.json"):
            return _indexed_files(path)
        if path.suffix != ".safetensors":
            raise InputError(f"{path}: not a .safetensors file")
        return [path]
    if not path.is_dir():
        raise InputError(f"{path}: no such file or folder")
    sources = list(dict.fromkeys(p for p in (_explicit(path), path / SINGLE_NAME, path / INDEX_NAME) if p))
    present = [p for p in sources if p.is_file()]
    if len(present) > 1:
        names = " and ".join(p.name for p in present)
        raise InputError(
            f"{path}: both {names}: transformers loads only {present[0].name}, other loaders may read the "
            "other, and one of them is stale",
            hint=f"remove the stale one, or audit one file: --trained {shlex.quote(str(present[0]))}",
        )
    if present:
        return _indexed_files(present[0]) if present[0].name.endswith(".index.json") else present
    if (path / ADAPTER_CONFIG).is_file():
        raise AdapterError(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InputError(f"{path}: no safetensors files", hint=_no_safetensors_hint(path))
    return files


def _explicit(path: Path) -> Path | None:
    """The file config.json's `transformers_weights` names (transformers loads it instead of the usual
    names), refused when it is not a plain safetensors file name inside the folder."""
    if not (path / "config.json").is_file():
        return None
    config, _ = read_json(path / "config.json", "the model config")
    name = config.get("transformers_weights") if isinstance(config, dict) else None
    if name is None:
        return None
    where = path / "config.json"
    if not isinstance(name, str) or name != Path(name).name or name in ("", ".", ".."):
        raise InputError(f"{where}: transformers_weights {name!r} is not a file name inside the folder")
    if not name.endswith((".safetensors", ".safetensors.index.json")) or not (path / name).is_file():
        raise InputError(f"{where}: transformers_weights {name!r} is no safetensors file in the folder")
    return path / name


def _indexed_files(index: Path) -> list[Path]:
    data, _ = read_json(index, "the shard index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f"{index}: not a shard index with a weight_map of tensor name -> shard file")
    out = []
    for shard in dict.fromkeys(weight_map.values()):
        if shard != Path(shard).name or shard in ("", ".", "..") or not (index.parent / shard).is_file():
            raise InputError(f"{index}: names shard {shard!r}, which is not a file in the folder")
        out.append(index.parent / shard)
    return out


def _no_safetensors_hint(path: Path) -> str:
    if any(path.glob("global_step*")):
        return "a DeepSpeed checkpoint: run its zero_to_fp32.py (or save_16bit_model) first"
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        return "llamapro never unpickles files: save with save_pretrained(..., safe_serialization=True)"
    return "point --trained at the folder (or file) the trainer saved the weights in"
