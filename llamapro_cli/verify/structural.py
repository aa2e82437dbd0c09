"""The structural half of `verify-identity`: an expanded checkpoint is its base plus zeroed copies.

For a layer mapping (new index -> source layer, identity or not) it checks, cheapest first:
1. config.json: every key the two configs share has the same value (the layer count and the per-layer
   fields aside), a key only one of them sets reads the same on both sides with the defaults filled in
   (through the caller's `normalise`: transformers' config classes), and every per-layer field gives
   each expanded layer exactly its source layer's behaviour (attention type, sliding threshold, ...),
   with transformers' default formulas applied where a config has no explicit list, so a legacy base
   compares correctly with an explicit expanded config;
2. the tensor sets: the same non-block tensors, and each layer has exactly its source's tensors, with the
   same dtypes and shapes (a cast to another dtype is named here);
3. the bytes: non-block tensors and every tensor of an original layer are byte-identical to the base's;
   an identity copy's tensors are byte-identical to its source's, except the family's zeroed tensors,
   which must be zero by value (-0.0 counts: other tools write it).

Given the zero argument (docs/concepts.md) this proves the identity for every input, which is why it
runs first and why the numerical check is a second, independent witness.

Invariant: tensor data is read in bounded chunks (`io.ranges.CHUNK` bytes per side), never whole tensors.
Must not: import torch or transformers; print.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from llamapro_cli.architectures.layers import effective_values
from llamapro_cli.architectures.parts import GENERIC_FIELDS
from llamapro_cli.architectures.record import Family, FieldKind, LayerField
from llamapro_cli.architectures.registry import renumber_extra
from llamapro_cli.architectures.rewrite import rewrite_config
from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.errors import LlamaproError
from llamapro_cli.lineage import tensor_is_zero
from llamapro_cli.plan import ExpansionPlan, NewLayer

# Config keys that record how a file was written, not what the model computes.
_BOOKKEEPING = frozenset({"transformers_version", "_name_or_path", "use_cache", "_commit_hash"})

Progress = Callable[[int, int], None]  # (bytes compared, bytes to compare)
# A config as the modelling code reads it, every default filled in (verify.py passes transformers').
Normalise = Callable[[Mapping[str, Any]], Mapping[str, Any] | None]
# Keys a config may gain or lose without changing what the weights compute (their dtypes are checked).
_ONE_SIDED_OK = frozenset({"dtype", "torch_dtype", "architectures"})


@dataclass(frozen=True)
class StructuralResult:
    """What the structural check found. `mismatch` is one line naming the first difference, or None."""

    ok: bool
    mismatch: str | None
    layer: int | None  # expanded layer index of the mismatch, when it is in a layer
    tensor: str | None  # checkpoint name of the mismatching tensor, or "config.json:<key>"
    tensors_checked: int
    bytes_compared: int
    seconds: float


class _Mismatch(Exception):
    def __init__(self, message: str, *, layer: int | None = None, tensor: str | None = None) -> None:
        super().__init__(message)
        self.message, self.layer, self.tensor = message, layer, tensor


def check_structure(
    base: Checkpoint,
    expanded: Checkpoint,
    plan: ExpansionPlan,
    *,
    progress: Progress | None = None,
    normalise: Normalise | None = None,
) -> StructuralResult:
    """Compare `expanded` with `base` under `plan`; the first mismatch is reported, not raised."""
    started = time.monotonic()
    walker = _Walker(base, expanded, plan, progress or (lambda done, total: None))
    try:
        check_config(base, expanded, plan, normalise=normalise)
        walker.check_names()
        walker.check_bytes()
    except _Mismatch as e:
        return walker.result(started, e)
    return walker.result(started, None)


# --- config.json ----------------------------------------------------------------------------------------


def check_config(
    base: Checkpoint, expanded: Checkpoint, plan: ExpansionPlan, *, normalise: Normalise | None = None
) -> None:
    """Shared keys equal; keys on one side only equal as `normalise` reads both configs; per-layer
    behaviour of every expanded layer equal to its source's."""
    family = expanded.family
    if base.family.name != family.name:
        raise _Mismatch(f"architecture {family.name} here, {base.family.name} in the base")
    if expanded.num_layers != plan.num_layers_out:
        raise _Mismatch(
            f"config.json: {family.count_key} is {expanded.num_layers}, the mapping has "
            f"{plan.num_layers_out} layers",
            tensor=f"config.json:{family.count_key}",
        )
    fields = layer_fields(family)
    skip = {family.count_key, *fields, *family.drop_keys, *(k for k, _ in family.set_keys)}
    expected = _expected_config(base, plan)
    old, new = _flat(family, expected), _flat(family, expanded.config)
    for key in sorted(old.keys() & new.keys()):
        if key.rsplit(".", 1)[-1] not in skip and old[key] != new[key]:
            raise _Mismatch(
                f"config.json: {key} is {new[key]!r} here but {old[key]!r} in the base",
                tensor=f"config.json:{key}",
            )
    one_sided = sorted(k for k in old.keys() ^ new.keys() if k.rsplit(".", 1)[-1] not in skip | _ONE_SIDED_OK)
    if one_sided and normalise is not None:
        _check_one_sided(family, one_sided, normalise(expected), normalise(expanded.config))
    for fld in fields.values():
        _check_field(fld, family, base, expanded, plan)


def _check_one_sided(
    family: Family, keys: list[str], old: Mapping[str, Any] | None, new: Mapping[str, Any] | None
) -> None:
    """A key only one config sets (a hand-written base leaves `rope_parameters` to the defaults, say) is
    equal only when the modelling code reads the same value on both sides, defaults filled in."""
    if old is None or new is None:
        return  # the configs cannot be read that way: only the shared keys could be compared
    old_flat, new_flat = _flat(family, old), _flat(family, new)
    for key in keys:
        mine, theirs = new_flat.get(key), old_flat.get(key)
        if mine != theirs:
            raise _Mismatch(
                f"config.json: {key} is {mine!r} here but {theirs!r} in the base (as transformers reads "
                "both configs, defaults filled in)",
                tensor=f"config.json:{key}",
            )


def _expected_config(base: Checkpoint, plan: ExpansionPlan) -> dict[str, Any]:
    """The base config as `expand` rewrites it for this plan (layer-indexed names remapped), or the base
    config itself when the plan cannot be expressed (the per-layer comparison then names the layer)."""
    try:
        return rewrite_config(base.family, base.config, plan)[0]
    except LlamaproError:
        return dict(base.config)


def layer_fields(family: Family) -> dict[str, LayerField]:
    """The per-layer config fields of a family (family records win over the generic ones, by key)."""
    return {f.key: f for f in (*GENERIC_FIELDS, *family.layer_fields)}


def _flat(family: Family, config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as dotted keys, the decoder sub-config flattened in."""
    head = family.config_path[0] if family.config_path else None
    out = _plain({k: v for k, v in config.items() if k != head})
    if head is not None:
        out.update({f"{head}.{k}": v for k, v in _plain(family.sub_config(config)).items()})
    return out


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    # transformers 5 writes `dtype` where 4.x wrote `torch_dtype`: the same fact under two names.
    out = {k: v for k, v in config.items() if k not in _BOOKKEEPING}
    if "torch_dtype" in out and "dtype" not in out:
        out["dtype"] = out.pop("torch_dtype")
    return out


def _check_field(
    fld: LayerField, family: Family, base: Checkpoint, expanded: Checkpoint, plan: ExpansionPlan
) -> None:
    old_cfg, new_cfg = family.sub_config(base.config), family.sub_config(expanded.config)
    present = old_cfg.get(fld.key) is not None or new_cfg.get(fld.key) is not None
    if not (present or fld.write_when_absent):
        return
    if fld.kind is FieldKind.THRESHOLD and fld.relevant is not None and not fld.relevant(old_cfg):
        return  # e.g. max_window_layers while sliding windows are switched off
    try:
        old = effective_values(fld, old_cfg, base.num_layers)
        new = effective_values(fld, new_cfg, expanded.num_layers)
    except LlamaproError as e:
        raise _Mismatch(e.message, tensor=f"config.json:{fld.key}") from None
    if old is None or new is None:
        return
    for layer in plan.layers:
        if new[layer.index] != old[layer.source]:
            raise _Mismatch(
                f"config.json: {fld.key} gives layer {layer.index} {new[layer.index]!r}, but its source "
                f"(base layer {layer.source}) has {old[layer.source]!r}",
                layer=layer.index,
                tensor=f"config.json:{fld.key}",
            )


# --- tensors --------------------------------------------------------------------------------------------


class _Walker:
    """Walks the expanded checkpoint's tensors against their sources, counting what it compared."""

    def __init__(self, base: Checkpoint, expanded: Checkpoint, plan: ExpansionPlan, progress: Progress):
        self.base, self.expanded, self.plan, self.progress = base, expanded, plan, progress
        self.base_blocks, self.base_other = base.split_blocks()
        self.blocks, self.other = expanded.split_blocks()
        self.tensors = 0
        self.bytes = 0
        self.total = expanded.total_bytes()

    def result(self, started: float, mismatch: _Mismatch | None) -> StructuralResult:
        return StructuralResult(
            ok=mismatch is None,
            mismatch=mismatch.message if mismatch else None,
            layer=mismatch.layer if mismatch else None,
            tensor=mismatch.tensor if mismatch else None,
            tensors_checked=self.tensors,
            bytes_compared=self.bytes,
            seconds=round(time.monotonic() - started, 3),
        )

    def pairs(self) -> Iterator[tuple[str, str, NewLayer | None]]:
        """(expanded name, base name, layer or None) for every tensor, non-block tensors first."""
        for name in self.other:
            yield name, self._base_name(name), None
        prefix, base_prefix = self.expanded.family.layer_prefix, self.base.family.layer_prefix
        for layer in self.plan.layers:
            for rel in self.blocks.get(layer.index, ()):
                yield f"{prefix}{layer.index}.{rel}", f"{base_prefix}{layer.source}.{rel}", layer

    def check_names(self) -> None:
        _same_set(
            {self._base_name(n) for n in self.other}, set(self.base_other), "non-block tensors", "", None
        )
        prefix = self.expanded.family.layer_prefix
        for new in self.plan.layers:
            _same_set(
                set(self.blocks.get(new.index, ())),
                set(self.base_blocks[new.source]),
                f"layer {new.index} (base layer {new.source})",
                f"{prefix}{new.index}.",
                new.index,
            )
        for name, base_name, layer in self.pairs():
            mine, theirs = self.expanded.info(name), self.base.info(base_name)
            if (mine.dtype, mine.shape) != (theirs.dtype, theirs.shape):
                raise _Mismatch(
                    f"{name} is {mine.dtype}{list(mine.shape)} but {base_name} in the base is "
                    f"{theirs.dtype}{list(theirs.shape)}",
                    layer=layer.index if layer else None,
                    tensor=name,
                )

    def check_bytes(self) -> None:
        for name, base_name, layer in self.pairs():
            where = layer.index if layer else None
            if layer is not None and layer.identity and self._zeroed(name):
                if not tensor_is_zero(self.expanded, name):
                    raise _Mismatch(
                        f"layer {layer.index} is an identity copy of base layer {layer.source}, but its "
                        f"{name} is not all zero",
                        layer=where,
                        tensor=name,
                    )
            elif not self._same_bytes(name, base_name):
                what = f"layer {layer.index} (base layer {layer.source})" if layer else "outside the layers"
                raise _Mismatch(
                    f"{what}: {name} differs from {base_name} in the base", layer=where, tensor=name
                )
            self.tensors += 1
            self.bytes += self.expanded.info(name).nbytes
            self.progress(self.bytes, self.total)

    def _base_name(self, name: str) -> str:
        """A non-block tensor's name in the base: layer-indexed extras (MTP layers) moved back down."""
        return renumber_extra(self.base.family, name, self.plan.num_layers_out, self.plan.num_layers_in)

    def _zeroed(self, name: str) -> bool:
        parts = self.expanded.family.split_name(name)
        return parts is not None and self.expanded.family.is_zeroed(parts[1])

    def _same_bytes(self, name: str, base_name: str) -> bool:
        pairs = zip(self.expanded.read_chunks(name), self.base.read_chunks(base_name), strict=True)
        # bytes == bytes is a memcmp; memoryview == memoryview compares element by element (slow).
        return all(mine.tobytes() == theirs.tobytes() for mine, theirs in pairs)


def _same_set(mine: set[str], theirs: set[str], what: str, prefix: str, layer: int | None) -> None:
    if mine == theirs:
        return
    missing, extra = sorted(theirs - mine), sorted(mine - theirs)
    detail = "; ".join(
        part
        for part in (
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"extra {', '.join(extra[:3])}" if extra else "",
        )
        if part
    )
    raise _Mismatch(
        f"{what}: tensor names differ from the base ({detail})",
        layer=layer,
        tensor=prefix + (missing or extra)[0],
    )
