"""The freeze map's JSON document (`freeze-map --format json`): reading it back and applying it to a model.

`load_manifest()` turns the document (a file or the parsed JSON) back into the `FreezeMap` it was written
from; `apply_freeze_map()` sets `requires_grad` on a loaded model from a map or a manifest.

Invariant: `load_manifest(to_jsonable(fm)) == fm` for every map `freeze_map()` returns.
Must not: print, import torch at module level (`apply_freeze_map` works on the caller's model).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamapro_cli.errors import InputError
from llamapro_cli.freeze.map import MANIFEST_KIND, MANIFEST_SCHEMA, FreezeMap, TensorEntry


def load_manifest(source: str | Path | Mapping[str, Any]) -> FreezeMap:
    """A `FreezeMap` from its JSON (a path or the parsed document), as `--format json` wrote it."""
    where = str(source) if not isinstance(source, Mapping) else "manifest"
    data: Any = source
    if not isinstance(source, Mapping):
        try:
            data = json.loads(Path(source).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{where}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{where}: not a readable JSON file ({e})") from None
    if not isinstance(data, Mapping) or data.get("kind") != MANIFEST_KIND:
        raise InputError(
            f"{where}: not a llamapro freeze-map manifest",
            hint="write one with: llamapro freeze-map EXPANDED --format json > map.json",
        )
    if data.get("schema_version") != MANIFEST_SCHEMA:
        raise InputError(f"{where}: manifest schema_version {data.get('schema_version')!r} is not supported")
    try:
        return _from_json(data)
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None


def _from_json(data: Mapping[str, Any]) -> FreezeMap:
    tensors = {
        str(name): TensorEntry(
            dtype=str(t["dtype"]),
            shape=tuple(int(d) for d in t["shape"]),
            parameter=None if t["parameter"] is None else str(t["parameter"]),
            sha256=None if t["sha256"] is None else str(t["sha256"]),
        )
        for name, t in data["tensors"].items()
    }
    strings = ("trainable", "frozen", "trainable_parameters", "frozen_parameters", "also", "notes")
    lists = {key: tuple(str(x) for x in data[key]) for key in strings}
    sources = data["sources"]
    return FreezeMap(
        schema_version=int(data["schema_version"]),
        kind=str(data["kind"]),
        checkpoint=str(data["checkpoint"]),
        architecture=str(data["architecture"]),
        num_layers=int(data["num_layers"]),
        new_layers=tuple(int(i) for i in data["new_layers"]),
        sources=None if sources is None else tuple(int(i) for i in sources),
        found_by=str(data["found_by"]),
        layer_prefix=str(data["layer_prefix"]),
        memory_prefix=str(data["memory_prefix"]),
        tied_embeddings=bool(data["tied_embeddings"]),
        trainable_tensors=int(data["trainable_tensors"]),
        frozen_tensors=int(data["frozen_tensors"]),
        trainable_numel=int(data["trainable_numel"]),
        frozen_numel=int(data["frozen_numel"]),
        digest_algorithm=data["digest_algorithm"],
        tensors=tensors,
        **lists,
    )


# --- applying a map to a loaded model -------------------------------------------------------------------


class ManifestMismatch(InputError):
    """The model does not have a parameter the freeze map names: it is not the model the map describes."""


@dataclass(frozen=True)
class FreezeCounts:
    """What `apply_freeze_map` did."""

    trainable_tensors: int
    trainable_parameters: int
    frozen_tensors: int
    frozen_parameters: int


def apply_freeze_map(model: Any, manifest: FreezeMap | str | Path | Mapping[str, Any]) -> FreezeCounts:
    """Set `requires_grad` on `model` (a torch module): the map's trainable parameters on, all others off.

    Raises `ManifestMismatch` (before touching anything) when a name in the map is not a parameter of
    `model`. Freeze before wrapping the model (PEFT, DeepSpeed, FSDP, accelerate), which renames or
    shards parameters.
    """
    fm = manifest if isinstance(manifest, FreezeMap) else load_manifest(manifest)
    params = dict(model.named_parameters())
    missing = [n for n in (*fm.trainable_parameters, *fm.frozen_parameters) if n not in params]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ManifestMismatch(
            f"the model has no parameter {shown} ({len(missing)} of the map's names are missing)",
            hint="apply the map to the unwrapped model it was made for, before PEFT/DeepSpeed/FSDP wrapping",
        )
    trainable = set(fm.trainable_parameters)
    counts = [0, 0, 0, 0]
    for name, param in params.items():
        on = name in trainable
        param.requires_grad_(on)
        slot = 0 if on else 2
        counts[slot] += 1
        counts[slot + 1] += int(param.numel())
    return FreezeCounts(*counts)
