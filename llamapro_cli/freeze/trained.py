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

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from llamapro_cli.checkpoint import INDEX_NAME, SINGLE_NAME
from llamapro_cli.errors import InputError
from llamapro_cli.freeze.map import FreezeMap, TensorEntry
from llamapro_cli.io.header import TensorInfo, read_header

# Wrappers trainers put in front of parameter names when saving a state dict.
WRAPPER_PREFIXES = ("base_model.model.", "_orig_mod.", "module.")


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
    return len(files), found, sorted(stripped), extra


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
    """The safetensors files of a trained checkpoint: a file, an index, model.safetensors, or all."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise InputError(f"{path}: not a .safetensors file")
        return [path]
    if not path.is_dir():
        raise InputError(f"{path}: no such file or folder")
    index = path / INDEX_NAME
    if index.is_file():
        return _indexed_files(index)
    if (path / SINGLE_NAME).is_file():
        return [path / SINGLE_NAME]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InputError(f"{path}: no safetensors files", hint=_no_safetensors_hint(path))
    return files


def _indexed_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = list(dict.fromkeys(str(v) for v in weight_map.values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{index}: not a shard index with a weight_map ({type(e).__name__})") from None
    out = []
    for shard in shards:
        if shard != Path(shard).name or not (index.parent / shard).is_file():
            raise InputError(f"{index}: names shard {shard!r}, which is not a file in the folder")
        out.append(index.parent / shard)
    return out


def _no_safetensors_hint(path: Path) -> str:
    if any(path.glob("global_step*")):
        return "a DeepSpeed checkpoint: run its zero_to_fp32.py (or save_16bit_model) first"
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        return "llamapro never unpickles files: save with save_pretrained(..., safe_serialization=True)"
    return "point --trained at the folder (or file) the trainer saved the weights in"
