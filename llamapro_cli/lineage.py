"""Which layers of an expanded checkpoint are identity copies, and of what: the layer mapping.

The source of truth is `llamapro.json` (for a model expanded more than once, its generations composed down
to the base asked for). For checkpoints expanded by other tools (LLaMA-Factory's
script, the authors' script, mergekit passthrough) the mapping is inferred from the weights: a layer
whose branch-final tensors (the family's zero list) are all zero *by value* is an identity copy (mergekit
writes -0.0, so the sign bit is ignored), and with the base checkpoint at hand each expanded layer is
matched to the base layer whose other tensors it shares (by a fingerprint of their leading bytes).

Invariant: reads only the tensors it needs, in bounded chunks, never whole models. Must not: import torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.errors import InputError
from llamapro_cli.io.ranges import CHUNK
from llamapro_cli.plan import ExpansionPlan, NewLayer, PlanKind
from llamapro_cli.provenance import Provenance, SourceRecord

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
    """The expanded checkpoint's layers in terms of the base's, and how they were found."""

    plan: ExpansionPlan
    how: str  # "llamapro.json", "llamapro.json (N expansions composed)" or "inferred from ..."
    source: SourceRecord | None = None  # what the record says about that base (None when inferred)


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
    """The layer mapping from llamapro.json, else inferred from the weights (needs `base`).

    A model expanded more than once records every earlier expansion (`parent`): the generations from the
    newest back to the one expanded from `base` are composed into one mapping, so the model verifies
    against any of its ancestors (default: its immediate source)."""
    record = expanded.provenance
    if record is not None:
        chain = _generations_from(record, base)
        try:
            plan = chain[0].expansion_plan()
            for older in chain[1:]:
                plan = compose(plan, older.expansion_plan())
        except ValueError as e:
            raise InputError(f"{expanded.root / 'llamapro.json'}: malformed layer record ({e})") from e
        if plan.num_layers_out != expanded.num_layers:
            raise InputError(
                f"{expanded.root / 'llamapro.json'} describes {plan.num_layers_out} layers, "
                f"config.json has {expanded.num_layers}"
            )
        how = "llamapro.json" if len(chain) == 1 else f"llamapro.json ({len(chain)} expansions composed)"
        return LayerMapping(plan, how, chain[-1].source)
    if base is None:
        raise InputError(
            f"{expanded.root}: no llamapro.json, so the layer mapping must be inferred",
            hint="pass the original checkpoint with --in",
        )
    return LayerMapping(infer_plan(expanded, base), "inferred from zero branch-final tensors")


def _generations_from(record: Provenance, base: Checkpoint | None) -> list[Provenance]:
    """The generations, newest first, down to the one whose source is `base`: matched by its config's
    sha256, else by its path or repo id, else by its layer count; the newest alone when none matches."""
    chain = list(record.generations())
    if base is None:
        return chain[:1]
    tests = (
        lambda s: s.config_sha256 is not None and s.config_sha256 == base.config_sha256,
        lambda s: s.path is not None and _same_path(s.path, base.root),
        lambda s: s.repo_id is not None and s.repo_id == base.repo_id,
        lambda s: s.num_layers == base.num_layers,
    )
    for matches in tests:
        for depth, generation in enumerate(chain):
            if matches(generation.source):
                return chain[: depth + 1]
    return chain[:1]


def _same_path(recorded: str, root: Path) -> bool:
    try:
        return Path(recorded).resolve() == root.resolve()
    except (OSError, RuntimeError, ValueError):  # a recorded path that cannot even be resolved
        return False


def compose(newer: ExpansionPlan, older: ExpansionPlan) -> ExpansionPlan:
    """`newer` (an expansion of `older`'s output) in terms of `older`'s input: an original layer of the
    newer expansion is whatever that layer was in the older one; a copy of anything is a copy of its
    source in the oldest base (its zeroed tensors are zero, the others are that base layer's)."""
    if newer.num_layers_in != older.num_layers_out:
        raise ValueError(
            f"an expansion of {newer.num_layers_in} layers recorded over one that made {older.num_layers_out}"
        )
    layers = []
    for layer in newer.layers:
        was = older.layers[layer.source]
        layers.append(NewLayer(layer.index, was.source, layer.identity or was.identity))
    copies = sorted(x.source for x in layers if x.identity)
    try:
        return ExpansionPlan.from_layers(older.num_layers_in, layers, kind=PlanKind.AFTER, after=copies)
    except ValueError:
        if PlanKind.LAYERS not in (newer.kind, older.kind):
            raise
        # A relayer generation: any map composes into a map (`is_identity_map` says what it is).
        return ExpansionPlan.from_layers(older.num_layers_in, layers, kind=PlanKind.LAYERS)


def infer_plan(expanded: Checkpoint, base: Checkpoint) -> ExpansionPlan:
    """Match each expanded layer to a base layer: originals in order, copies by fingerprint."""
    if expanded.num_layers == base.num_layers:
        raise InputError(
            f"{expanded.root} has as many layers as {base.root} ({base.num_layers}), so it is not an "
            "expansion of it",
            hint=f"if it is {base.root} after training, check what training changed with: llamapro "
            f"verify-frozen --map {base.root} --trained {expanded.root}",
        )
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
