"""A freeze map applied elsewhere: to a loaded model (`requires_grad`), or to a checkpoint that carries no
record of its own (a trainer's saved checkpoint), taking the new layers from the expanded checkpoint it
was trained from.

`apply_freeze_map()` sets `requires_grad` on a model from a map or a manifest; `freeze_map_from()` is
`freeze-map TRAINED --map EXPANDED_OR_MANIFEST`: the trained checkpoint's own tensors, the reference's
new layers, after checking that both describe the same model (architecture, layers, tensor names and
shapes).

Invariant: nothing is changed on a model before every name of the map is found in it.
Must not: print, import torch at module level (`apply_freeze_map` works on the caller's model).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.errors import InputError, UsageError
from llamapro_cli.freeze.manifest import load_manifest
from llamapro_cli.freeze.map import FreezeMap, NewLayers, Role, build_map, freeze_map, parse_roles


def reference_map(source: str | Path | FreezeMap, also: Iterable[str | Role] = ()) -> tuple[FreezeMap, str]:
    """(map, label) from `--map`: a manifest file, or an expanded checkpoint (folder or repo id)."""
    if isinstance(source, FreezeMap):
        return source, source.checkpoint
    path = Path(source).expanduser()
    if path.exists() and not path.is_dir():  # a file (or a FIFO, refused by the bounded read)
        if parse_roles(also):
            raise UsageError("--also applies when --map is a checkpoint folder; a manifest records its roles")
        return load_manifest(path), str(path)
    return freeze_map(source, also=also), str(source)


def freeze_map_from(
    checkpoint: str | Path,
    reference: str | Path | FreezeMap,
    *,
    also: Iterable[str | Role] = (),
    revision: str | None = None,
) -> FreezeMap:
    """The freeze map of `checkpoint` (a trainer's save of an expanded model, which no longer shows which
    layers are new) with the new layers of `reference`: that expanded checkpoint, or its manifest."""
    ref, label = reference_map(reference, also)
    ckpt = Checkpoint.open(checkpoint, revision=revision)
    _check_same_model(ckpt, ref, label)
    layers = NewLayers(ref.new_layers, ref.sources, f"{ref.found_by} of {label} (--map)")
    return build_map(ckpt, layers, parse_roles(ref.also), None)


def _check_same_model(ckpt: Checkpoint, ref: FreezeMap, label: str) -> None:
    """The trained checkpoint must be the model the map describes: same record, layers, names, shapes.
    A tied head may be stored on one side only (trainers untie or drop it)."""
    heads = set(ckpt.family.roles.head)
    mine = {n for n in ckpt.weight_map if n not in heads}
    theirs = {n for n in ref.tensors if n not in heads}
    detail: str | None = None
    if (ckpt.family.name, ckpt.num_layers) != (ref.architecture, ref.num_layers):
        detail = (
            f"{ckpt.family.name}, {ckpt.num_layers} layers; the map: {ref.architecture}, {ref.num_layers}"
        )
    elif mine != theirs:
        odd = sorted(mine ^ theirs)[0]
        detail = f"{odd} is in {'this checkpoint' if odd in mine else 'the map'} only"
    else:
        odd = next((n for n in sorted(mine) if ckpt.info(n).shape != ref.tensors[n].shape), "")
        if odd:
            detail = f"{odd} has shape {list(ckpt.info(odd).shape)}, not {list(ref.tensors[odd].shape)}"
    if detail is not None:
        raise InputError(
            f"{ckpt.root}: not the model the map {label} describes ({detail})",
            hint="--map is the expanded checkpoint this one was trained from, or its freeze-map manifest",
        )


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
