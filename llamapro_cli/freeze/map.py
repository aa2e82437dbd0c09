"""The freeze map: which tensors of an expanded checkpoint training updates, under both kinds of names.

`freeze_map()` reads an expanded checkpoint's headers and its `llamapro.json` (the source of truth for the
new layers; without it, layers whose branch-final tensors are all zero by value are the new ones) and
returns a `FreezeMap`: the trainable and frozen names as **checkpoint keys** (what `verify-frozen`
audits) and as **in-memory parameter names** (what trainers match, `named_parameters()`), their counts,
and the per-tensor dtype, shape and sha256 (when `expand --digests` recorded them). The `--format json`
document (reading it back, applying it to a loaded model) lives in `manifest.py`, the trainer snippets in
`trainers.py`, the audit of a trained checkpoint in `audit.py`.

Invariant: the two kinds of names are derived through the architecture record (`Family.layer_prefix`,
`memory_prefix`, `roles`) and never mixed: `trainable`/`frozen` are checkpoint keys,
`trainable_parameters`/`frozen_parameters` are `named_parameters()` names. A tied head is a checkpoint
key (when stored) but never a parameter name: transformers registers the shared matrix once.
Must not: print, import torch at module level, read tensor data except the zero test of `lineage`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from llamapro_cli.architectures.record import Family
from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.errors import InputError, UsageError
from llamapro_cli.freeze.claims import check_new_layers, zero_by_digest, zero_by_value
from llamapro_cli.lineage import layer_mapping, zeroed_layers
from llamapro_cli.plan import PlanKind

MANIFEST_SCHEMA = 1
MANIFEST_KIND = "llamapro freeze-map"
FOUND_BY_RECORD = "llamapro.json"
FOUND_BY_ZEROS = "inferred from zero branch-final tensors"


class Role(StrEnum):
    """Non-block tensors `--also` can make trainable (resolved through `Family.roles`)."""

    EMBEDDINGS = "embeddings"
    HEAD = "head"
    FINAL_NORM = "final-norm"


@dataclass(frozen=True)
class TensorEntry:
    """One checkpoint tensor: its dtype and shape on disk, its parameter name, its recorded digest."""

    dtype: str
    shape: tuple[int, ...]
    parameter: str | None  # in-memory name; None for a tied head or a buffer (not a separate parameter)
    sha256: str | None


@dataclass(frozen=True)
class FreezeMap:
    """What to train in an expanded checkpoint. `--format json` prints exactly this (docs/freeze-map.md)."""

    schema_version: int
    kind: str
    checkpoint: str
    architecture: str
    num_layers: int
    new_layers: tuple[int, ...]
    sources: tuple[int, ...] | None  # the layer each new layer was copied from; None when inferred
    found_by: str
    layer_prefix: str  # checkpoint keys of layer i start with f"{layer_prefix}{i}."
    memory_prefix: str  # in-memory parameter names of layer i start with f"{memory_prefix}{i}."
    also: tuple[str, ...]
    tied_embeddings: bool
    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    trainable_parameters: tuple[str, ...]
    frozen_parameters: tuple[str, ...]
    trainable_tensors: int
    frozen_tensors: int
    trainable_numel: int
    frozen_numel: int
    digest_algorithm: str | None
    tensors: dict[str, TensorEntry]
    notes: tuple[str, ...] = field(default=())

    def parameter_numel(self) -> dict[str, int]:
        """In-memory parameter name -> element count (summed when several keys load into one)."""
        counts: dict[str, int] = {}
        for entry in self.tensors.values():
            if entry.parameter is not None:
                numel = 1
                for d in entry.shape:
                    numel *= d
                counts[entry.parameter] = counts.get(entry.parameter, 0) + numel
        return counts


@dataclass(frozen=True)
class NewLayers:
    """Which layers training updates, the layer each was copied from (None when unknown), and how."""

    indices: tuple[int, ...]
    sources: tuple[int, ...] | None
    found_by: str


def freeze_map(
    checkpoint: str | Path | Checkpoint, *, also: Iterable[str | Role] = (), revision: str | None = None
) -> FreezeMap:
    """The freeze map of an expanded checkpoint: its new layers trainable (plus `also` roles)."""
    ckpt = (
        checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.open(checkpoint, revision=revision)
    )
    roles = parse_roles(also)
    digests = _digests(ckpt)
    return build_map(ckpt, _new_layers(ckpt, digests), roles, digests)


def build_map(
    ckpt: Checkpoint, layers: NewLayers, roles: Sequence[Role], digests: Mapping[str, str] | None
) -> FreezeMap:
    """The map of `ckpt` with `layers` trainable (plus `roles`); `digests` describe its tensors."""
    family = ckpt.family
    tied = is_tied(ckpt)
    notes: list[str] = []
    role_names = _resolve_roles(ckpt, roles, tied, notes)
    new_layers = layers.indices
    trainable_keys = {n for n in ckpt.weight_map if family.layer_of(n) in new_layers} | role_names
    tensors = {
        name: TensorEntry(
            dtype=ckpt.info(name).dtype,
            shape=ckpt.info(name).shape,
            parameter=parameter_name(family, name, tied=tied),
            sha256=digests.get(name) if digests else None,
        )
        for name in ckpt.tensor_names()
    }
    if tied and not {Role.EMBEDDINGS, Role.HEAD} & set(roles):
        notes.append(_tied_note(ckpt))
    if layers.found_by == FOUND_BY_ZEROS:
        notes.append(
            "no llamapro.json: the new layers were found because their branch-final tensors are all zero; "
            "after training starts they no longer are, so keep this map (--format json) before training"
        )
    notes.extend(_parent_note(ckpt, new_layers))
    return _build(ckpt, tensors, trainable_keys, layers, tuple(roles), tied, notes, digests)


def _build(
    ckpt: Checkpoint,
    tensors: dict[str, TensorEntry],
    trainable_keys: set[str],
    layers: NewLayers,
    roles: tuple[Role, ...],
    tied: bool,
    notes: list[str],
    digests: Mapping[str, str] | None,
) -> FreezeMap:
    family = ckpt.family
    trainable = tuple(n for n in tensors if n in trainable_keys)
    frozen = tuple(n for n in tensors if n not in trainable_keys)
    return FreezeMap(
        schema_version=MANIFEST_SCHEMA,
        kind=MANIFEST_KIND,
        checkpoint=ckpt.repo_id or str(ckpt.root),
        architecture=family.name,
        num_layers=ckpt.num_layers,
        new_layers=layers.indices,
        sources=layers.sources,
        found_by=layers.found_by,
        layer_prefix=family.layer_prefix,
        memory_prefix=memory_name(family, family.layer_prefix),
        also=tuple(r.value for r in roles),
        tied_embeddings=tied,
        trainable=trainable,
        frozen=frozen,
        trainable_parameters=_parameters(tensors, trainable),
        frozen_parameters=_parameters(tensors, frozen),
        trainable_tensors=len(trainable),
        frozen_tensors=len(frozen),
        trainable_numel=sum(ckpt.info(n).numel for n in trainable),
        frozen_numel=sum(ckpt.info(n).numel for n in frozen),
        digest_algorithm="sha256" if digests else None,
        tensors=tensors,
        notes=tuple(notes),
    )


def _parameters(tensors: Mapping[str, TensorEntry], keys: Sequence[str]) -> tuple[str, ...]:
    # dict.fromkeys: several checkpoint keys may load into one parameter (fused experts); keep order.
    names = (tensors[k].parameter for k in keys)
    return tuple(dict.fromkeys(n for n in names if n is not None))


def _new_layers(ckpt: Checkpoint, digests: Mapping[str, str] | None) -> NewLayers:
    if ckpt.provenance is not None:
        plan = layer_mapping(ckpt).plan
        copies = [layer for layer in plan.layers if layer.identity]
        indices = tuple(c.index for c in copies)
        # The record only says which layers are new: check it against the weights before trusting it.
        # With digests, against them (the folder may have been trained in place since).
        is_zero = zero_by_digest(digests, lambda n: ckpt.info(n).nbytes) if digests else zero_by_value(ckpt)
        where = str(ckpt.root / "llamapro.json")
        check_new_layers(
            ckpt.family, ckpt.family.layer_prefix, ckpt.weight_map, indices, is_zero, where=where
        )
        if not copies:
            raise InputError(
                f"{where}: this checkpoint's layer map (--layers {plan.spec}) has no zeroed copy, so no "
                "layer is new and there is nothing to train",
                hint="make zeroed copies to train: llamapro relayer --layers SPEC with z layers, or expand",
            )
        # Sources index the input as the i-th layer that is not new (manifest, learning report). After a
        # relayer map that repeats, drops or reorders layers, the i-th kept layer holding the copy's
        # source stands for it; a copy of a dropped layer has none, and then no source is given.
        kept = [layer.source for layer in plan.layers if not layer.identity]
        first = {source: i for i, source in reversed(list(enumerate(kept)))}
        sources = tuple(first.get(c.source, -1) for c in copies)
        return NewLayers(indices, None if -1 in sources else sources, FOUND_BY_RECORD)
    # Without llamapro.json and without the base checkpoint only the zero test can say which are new.
    found = tuple(zeroed_layers(ckpt))
    if not found:
        raise InputError(
            f"{ckpt.root}: no new layers found (no llamapro.json, and no layer whose branch-final "
            "tensors are all zero)",
            hint="freeze-map reads an expanded checkpoint (llamapro expand --every N --in BASE --out DIR); "
            "for a trainer's saved checkpoint add --map EXPANDED (the expanded folder or its manifest)",
        )
    return NewLayers(found, None, FOUND_BY_ZEROS)


def parse_roles(also: Iterable[str | Role] | str) -> tuple[Role, ...]:
    """`--also embeddings,head` (or an iterable of roles) -> roles in canonical order, deduplicated."""
    items = also.split(",") if isinstance(also, str) else list(also)
    roles: set[Role] = set()
    for item in items:
        text = item.value if isinstance(item, Role) else item.strip().lower().replace("_", "-")
        if not text:
            continue
        try:
            roles.add(Role(text))
        except ValueError:
            raise UsageError(
                f"--also: unknown role {item!r}", hint="roles: " + ", ".join(r.value for r in Role)
            ) from None
    return tuple(r for r in Role if r in roles)


def role_keys(family: Family, role: Role, *, tied: bool) -> tuple[str, ...]:
    """The checkpoint keys `--also role` may make trainable (those present are). A tied head *is* the
    embedding matrix: training "the head" trains the embeddings."""
    source = Role.EMBEDDINGS if role is Role.HEAD and tied else role
    roles = family.roles
    return {Role.EMBEDDINGS: roles.embeddings, Role.HEAD: roles.head, Role.FINAL_NORM: roles.final_norm}[
        source
    ]


def _resolve_roles(ckpt: Checkpoint, roles: Sequence[Role], tied: bool, notes: list[str]) -> set[str]:
    names: set[str] = set()
    for role in roles:
        keys = role_keys(ckpt.family, role, tied=tied)
        found = [n for n in keys if n in ckpt.weight_map]
        if not found:
            raise UsageError(
                f"--also {role.value}: this checkpoint has no such tensor (looked for {', '.join(keys)})"
            )
        if role is Role.HEAD and tied:
            notes.append(
                f"tied embeddings: the head is the embedding matrix ({', '.join(found)}); "
                "--also head makes the embeddings trainable"
            )
        names.update(found)
    return names


def _tied_note(ckpt: Checkpoint) -> str:
    embed = ", ".join(n for n in ckpt.family.roles.embeddings if n in ckpt.weight_map) or "the embeddings"
    return f"tied embeddings: the head shares {embed}, which stays frozen (add --also embeddings to train it)"


def is_tied(ckpt: Checkpoint) -> bool:
    """Whether the head shares the embedding matrix (config says so, or the checkpoint has no head)."""
    sub = ckpt.family.sub_config(ckpt.config)
    tied = sub.get("tie_word_embeddings", ckpt.config.get("tie_word_embeddings"))
    has_head = any(name in ckpt.weight_map for name in ckpt.family.roles.head)
    return bool(tied) or not has_head


def _digests(ckpt: Checkpoint) -> dict[str, str] | None:
    """The record's digest table, checked to name exactly the checkpoint's tensors (None: no digests)."""
    record = ckpt.provenance.digests if ckpt.provenance else None
    if record is None:
        return None
    tensors = record.tensors
    if record.algorithm != "sha256" or tensors is None:
        raise InputError(f"{ckpt.root / 'llamapro.json'}: digests are not a sha256 table of tensor names")
    if set(tensors) != set(ckpt.weight_map):
        raise InputError(
            f"{ckpt.root / 'llamapro.json'}: its digests name other tensors than the checkpoint holds",
            hint="the folder was modified after expand; re-expand with --digests",
        )
    return {str(k): str(v) for k, v in tensors.items()}


def _parent_note(ckpt: Checkpoint, new_layers: Sequence[int]) -> list[str]:
    record = ckpt.provenance
    if record is None or record.parent is None:
        return []
    earlier = record.parent.new_layers
    now: dict[int, list[int]] = {}
    for x in record.layers:
        if not x.identity:
            now.setdefault(x.source, []).append(x.index)
    moved = sorted(i for j in earlier for i in now.get(j, ()))
    if record.plan.kind == PlanKind.LAYERS:
        return [
            f"relayered from an earlier llamapro output: only this map's zeroed copies "
            f"({_join(new_layers)}) are trainable; the earlier new layers are now layers {_join(moved)} "
            "and stay frozen"
        ]
    return [
        f"expanded twice: only the latest expansion's layers ({_join(new_layers)}) are trainable; "
        f"the earlier new layers are now layers {_join(moved)} and stay frozen"
    ]


def _join(values: Iterable[int]) -> str:
    return ", ".join(map(str, values)) or "-"


# --- names ----------------------------------------------------------------------------------------------


def parameter_name(family: Family, key: str, *, tied: bool) -> str | None:
    """The parameter a checkpoint key loads into; None for a tied head or a key that loads as a buffer."""
    if tied and key in family.roles.head:
        return None
    return memory_name(family, key) or None


def memory_name(family: Family, key: str) -> str:
    """The in-memory parameter name transformers gives checkpoint key `key` (identity for most families).

    The family's block prefix maps to `memory_prefix`; other keys under the same text-model root move with
    it (e.g. `language_model.model.` on disk -> `model.language_model.` in memory). Then the record's
    `memory_renames` apply: keys fused at load (MoE experts) all get the fused parameter's name, and a
    key renamed to "" loads as a buffer, not a parameter.
    """
    name = _memory_prefixed(family, key)
    for pattern, replacement in family.memory_renames:
        name = re.sub(pattern, replacement, name)
    return name


def _memory_prefixed(family: Family, key: str) -> str:
    disk = family.layer_prefix
    memory = family.memory_prefix or disk
    if key.startswith(disk):
        return memory + key[len(disk) :]
    disk_root, memory_root = _roots(disk, memory)
    if disk_root != memory_root and key.startswith(disk_root):
        return memory_root + key[len(disk_root) :]
    return key


def _roots(disk: str, memory: str) -> tuple[str, str]:
    """Drop common trailing segments: ('a.model.layers.', 'model.a.layers.') -> ('a.model.', 'model.a.')."""
    d, m = disk.rstrip(".").split("."), memory.rstrip(".").split(".")
    while d and m and d[-1] == m[-1]:
        d, m = d[:-1], m[:-1]
    return "".join(s + "." for s in d), "".join(s + "." for s in m)
