"""Which layers of an expanded checkpoint are identity copies, and of what: the layer mapping.

The source of truth is `llamapro.json`. For checkpoints expanded by other tools (LLaMA-Factory's
script, the authors' script, mergekit passthrough) the mapping is inferred from the weights: a layer
whose branch-final tensors (the family's zero list) are all zero *by value* is an identity copy (mergekit
writes -0.0, so the sign bit is ignored), and with the base checkpoint at hand each expanded layer is
matched to the base layer whose other tensors it shares (by a fingerprint of their leading bytes).

Invariant: reads only the tensors it needs, in bounded chunks, never whole models. Must not: import torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.errors import InputError
from llamapro_cli.io.ranges import CHUNK
from llamapro_cli.plan import ExpansionPlan, NewLayer, PlanKind

FINGERPRINT_BYTES = 64 * 1024
# Sign-bit masks per float dtype, so -0.0 counts as zero; integer dtypes compare exactly.
_SIGN_MASK = {
    "F64": (8, 0x7FFF_FFFF_FFFF_FFFF),
    "F32": (4, 0x7FFF_FFFF),
    "F16": (2, 0x7FFF),
    "BF16": (2, 0x7FFF),
    "F8_E4M3": (1, 0x7F),
    "F8_E5M2": (1, 0x7F),
}


@dataclass(frozen=True)
class LayerMapping:
    """The expanded checkpoint's layers, and how they were found."""

    plan: ExpansionPlan
    how: str  # "llamapro.json" or "inferred from zero branch-final tensors"


def tensor_is_zero(ckpt: Checkpoint, name: str) -> bool:
    """True when every element of the tensor is zero by value (+0.0 or -0.0 for floats)."""
    import numpy as np

    info = ckpt.info(name)
    width, mask = _SIGN_MASK.get(info.dtype, (1, 0xFF))
    view = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[width]
    step = max(width, CHUNK - CHUNK % width)  # whole elements per chunk
    return not any(
        np.any(np.frombuffer(chunk, dtype=view) & view(mask)) for chunk in ckpt.read_chunks(name, step=step)
    )


def zeroed_layers(ckpt: Checkpoint) -> list[int]:
    """Layers whose branch-final tensors exist and are all zero by value: identity copies."""
    blocks, _ = ckpt.split_blocks()
    prefix = ckpt.family.layer_prefix
    found = []
    for index in sorted(blocks):
        targets = [rel for rel in blocks[index] if ckpt.family.is_zeroed(rel)]
        if targets and all(tensor_is_zero(ckpt, f"{prefix}{index}.{rel}") for rel in targets):
            found.append(index)
    return found


def layer_fingerprint(ckpt: Checkpoint, index: int) -> str:
    """A digest of the leading bytes of every tensor of a layer that a copy keeps unchanged."""
    blocks, _ = ckpt.split_blocks()
    prefix = ckpt.family.layer_prefix
    digest = hashlib.sha256()
    for rel in sorted(blocks[index]):
        if ckpt.family.is_zeroed(rel):
            continue
        name = f"{prefix}{index}.{rel}"
        info = ckpt.info(name)
        digest.update(f"{rel}:{info.dtype}:{info.shape}".encode())
        digest.update(ckpt.read_bytes(name, size=min(info.nbytes, FINGERPRINT_BYTES)))
    return digest.hexdigest()


def layer_mapping(expanded: Checkpoint, base: Checkpoint | None = None) -> LayerMapping:
    """The layer mapping from llamapro.json, else inferred from the weights (needs `base`)."""
    record = expanded.provenance
    if record is not None:
        try:
            plan = record.expansion_plan()
        except ValueError as e:
            raise InputError(f"{expanded.root / 'llamapro.json'}: malformed layer record ({e})") from e
        if plan.num_layers_out != expanded.num_layers:
            raise InputError(
                f"{expanded.root / 'llamapro.json'} describes {plan.num_layers_out} layers, "
                f"config.json has {expanded.num_layers}"
            )
        return LayerMapping(plan, "llamapro.json")
    if base is None:
        raise InputError(
            f"{expanded.root}: no llamapro.json, so the layer mapping must be inferred",
            hint="pass the original checkpoint with --in",
        )
    return LayerMapping(infer_plan(expanded, base), "inferred from zero branch-final tensors")


def infer_plan(expanded: Checkpoint, base: Checkpoint) -> ExpansionPlan:
    """Match each expanded layer to a base layer: originals in order, copies by fingerprint."""
    copies = set(zeroed_layers(expanded))
    originals = [j for j in range(expanded.num_layers) if j not in copies]
    if len(originals) != base.num_layers or not copies:
        raise InputError(
            f"{expanded.root}: found {len(copies)} zeroed layers and {len(originals)} others, "
            f"but the base has {base.num_layers} layers; no consistent mapping",
            hint="is --in the checkpoint this one was expanded from?",
        )
    base_prints = {layer_fingerprint(base, i): i for i in range(base.num_layers)}
    layers: list[NewLayer] = []
    seen = -1
    for j in range(expanded.num_layers):
        source = base_prints.get(layer_fingerprint(expanded, j))
        if j in copies:
            source = source if source is not None and source <= seen else seen
            layers.append(NewLayer(j, source, True))
        else:
            seen += 1
            layers.append(NewLayer(j, seen, False))
    try:
        return ExpansionPlan.from_layers(
            base.num_layers, layers, kind=PlanKind.AFTER, after=sorted(x.source for x in layers if x.identity)
        )
    except ValueError as e:
        raise InputError(f"{expanded.root}: no consistent layer mapping ({e})") from e
