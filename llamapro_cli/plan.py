"""The layer plan: which layer of the output model comes from which source layer.

Owns `ExpansionPlan` (one canonical list: for every new index j, its source index and whether it is a
zeroed identity copy), `plan_expansion()` (`--every` / `--after` / `--add` turned into that list),
`plan_map()` (a `relayer` layer map) and `plan_options()` (the options that reproduce a plan).

Invariant: a plan can only exist in a valid layout: indices 0..n-1 in order; for every/after/add, every
original layer exactly once and in order, each copy's source an original placed before it (an identity
map); for `layers`, any sources of the input, repeated, dropped or reordered (`is_identity_map` says
whether it is one). Consumers (expand, relayer, verify-identity, freeze-map) read the layers only.
Must not: touch the filesystem, import torch, or know about model families (whether a family's config
can express a plan is checked in `architectures/`, on the plan this module returns).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from llamapro_cli.errors import UsageError
from llamapro_cli.layer_map import Entry, format_spec
from llamapro_cli.option_text import parse_after as parse_after  # re-exported: the plan's option texts
from llamapro_cli.option_text import parse_int as parse_int
from llamapro_cli.option_text import shown as shown


class Placement(StrEnum):
    """Where `--add K` puts its K copies (a StrEnum: a str whose value is the CLI spelling)."""

    INTERLEAVE = "interleave"
    TOP = "top"
    BOTTOM = "bottom"


class PlanKind(StrEnum):
    """Which option produced the plan (recorded in llamapro.json)."""

    EVERY = "every"
    AFTER = "after"
    ADD = "add"
    LAYERS = "layers"  # any layer map (`relayer`): layers may repeat, drop or reorder the source's


@dataclass(frozen=True)
class NewLayer:
    """One layer of the expanded model."""

    index: int  # index in the expanded model
    source: int  # index in the original model it is copied from
    identity: bool  # True: an inserted copy with zeroed branch outputs; False: the original layer itself


@dataclass(frozen=True)
class ExpansionPlan:
    """The canonical layout of an expanded model, plus the options that produced it."""

    kind: PlanKind
    num_layers_in: int
    layers: tuple[NewLayer, ...]
    every: int | None = None
    copies: int | None = None
    after: tuple[int, ...] | None = None
    add: int | None = None
    placement: Placement | None = None
    warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind is PlanKind.LAYERS:
            _check_map(self.num_layers_in, self.layers)
        else:
            _check_layout(self.num_layers_in, self.layers)

    @property
    def is_identity_map(self) -> bool:
        """Every source layer once, in order, as itself; the rest zeroed copies (true of every/after/add
        plans): the output computes what the source does. Consumers that assume it must check it."""
        kept = [layer.source for layer in self.layers if not layer.identity]
        return kept == list(range(self.num_layers_in))

    @property
    def spec(self) -> str:
        """The canonical `--layers` SPEC of this plan (`0-3,3z,4-7`), whatever its kind."""
        return format_spec((layer.source, layer.identity) for layer in self.layers)

    @property
    def num_layers_out(self) -> int:
        return len(self.layers)

    @property
    def new_indices(self) -> tuple[int, ...]:
        """Indices (in the expanded model) of the identity copies: the layers training updates."""
        return tuple(layer.index for layer in self.layers if layer.identity)

    @property
    def original_to_new(self) -> dict[int, int]:
        """Original layer index -> its index in the expanded model."""
        return {layer.source: layer.index for layer in self.layers if not layer.identity}

    def to_record(self) -> dict[str, Any]:
        """The `"plan"` object of llamapro.json (JSON types only: enum values, lists, None where unused)."""
        if self.kind is PlanKind.LAYERS:
            return {"kind": self.kind.value, "spec": self.spec}
        return {
            "kind": self.kind.value,
            "every": self.every,
            "copies": self.copies,
            "after": list(self.after) if self.after is not None else None,
            "add": self.add,
            "placement": self.placement.value if self.placement is not None else None,
        }

    @classmethod
    def from_layers(
        cls,
        num_layers_in: int,
        layers: Sequence[NewLayer | Sequence[Any] | Mapping[str, Any]],
        *,
        kind: PlanKind | str,
        every: int | None = None,
        copies: int | None = None,
        after: Sequence[int] | None = None,
        add: int | None = None,
        placement: Placement | str | None = None,
        spec: str | None = None,
        warnings: Sequence[str] = (),
    ) -> ExpansionPlan:
        """Rebuild a plan from llamapro.json: `from_layers(L, rec["layers"], **rec["plan"])`.

        `layers` items may be `NewLayer`s, `(index, source, identity)` triples or the record's
        `{"index", "source", "identity"}` objects. Raises `ValueError` (one line) on anything malformed;
        the caller decides which user-facing error that is, since it knows the file.
        """
        if not _is_int(num_layers_in):
            raise ValueError(f"num_layers must be an integer, got {num_layers_in!r}")
        try:
            plan_kind = PlanKind(kind)
            where = Placement(placement) if placement is not None else None
        except ValueError as exc:
            raise ValueError(f"plan: {exc}") from None
        for name, value in (("every", every), ("copies", copies), ("add", add)):
            if value is not None and not _is_int(value):
                raise ValueError(f"plan: {name} must be an integer or null, got {value!r}")
        if after is not None and (isinstance(after, str) or not all(_is_int(i) for i in after)):
            raise ValueError(f"plan: after must be a list of integers or null, got {after!r}")
        plan = cls(
            kind=plan_kind,
            num_layers_in=num_layers_in,
            layers=tuple(_to_new_layer(pos, item) for pos, item in enumerate(layers)),
            every=every,
            copies=copies,
            after=tuple(after) if after is not None else None,
            add=add,
            placement=where,
            warnings=tuple(warnings),
        )
        if spec is not None and spec != plan.spec:  # the layers are the truth; a spec must agree
            raise ValueError(f"plan: spec {spec!r} does not match its layers ({plan.spec})")
        return plan


def _is_int(value: object) -> bool:
    # JSON `true` is a Python bool, which is an int subclass; a layer index must not be one.
    return isinstance(value, int) and not isinstance(value, bool)


def _to_new_layer(pos: int, item: NewLayer | Sequence[Any] | Mapping[str, Any]) -> NewLayer:
    if isinstance(item, NewLayer):
        index, source, identity = item.index, item.source, item.identity
    elif isinstance(item, Mapping):
        if set(item) != {"index", "source", "identity"}:
            raise ValueError(f"layers[{pos}]: expected keys index, source, identity, got {sorted(item)}")
        index, source, identity = item["index"], item["source"], item["identity"]
    elif not isinstance(item, str) and len(item) == 3:
        index, source, identity = item
    else:
        raise ValueError(f"layers[{pos}]: expected an (index, source, identity) entry, got {item!r}")
    if not (_is_int(index) and _is_int(source) and isinstance(identity, bool)):
        raise ValueError(f"layers[{pos}]: index and source must be integers and identity a boolean")
    return NewLayer(index=index, source=source, identity=identity)


def _check_layout(num_layers: int, layers: tuple[NewLayer, ...]) -> None:
    """Raise ValueError unless `layers` is a valid expansion of `num_layers` original layers."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    next_original = 0
    for pos, layer in enumerate(layers):
        if not isinstance(layer, NewLayer):
            raise ValueError(f"layers[{pos}] is a {type(layer).__name__}, not a NewLayer")
        if layer.index != pos:
            raise ValueError(f"layers[{pos}] has index {layer.index}; indices must be 0..n-1 in order")
        if layer.identity:
            # Copies may only repeat a layer already placed: that is how every plan kind builds them, and
            # it keeps "source" meaningful as "the block this one starts as".
            if not 0 <= layer.source < next_original:
                raise ValueError(
                    f"layers[{pos}] is a copy of layer {layer.source}, which is not an original layer "
                    f"placed before it (of {num_layers})"
                )
        elif layer.source >= num_layers:
            raise ValueError(f"layers[{pos}] is original layer {layer.source}, outside 0..{num_layers - 1}")
        elif layer.source != next_original:
            raise ValueError(
                f"layers[{pos}] is original layer {layer.source} where layer {next_original} was expected"
            )
        else:
            next_original += 1
    if next_original != num_layers:
        raise ValueError(f"layers list {next_original} original layers, expected {num_layers}")


def _check_map(num_layers: int, layers: tuple[NewLayer, ...]) -> None:
    """Raise ValueError unless `layers` (indices 0..n-1, n >= 1) take sources among `num_layers` layers."""
    if num_layers < 1 or not layers:
        raise ValueError(f"a layer map needs source and output layers, got {num_layers} -> {len(layers)}")
    for pos, layer in enumerate(layers):
        if not isinstance(layer, NewLayer) or layer.index != pos:
            raise ValueError(f"layers[{pos}] is not layer {pos} of the map; indices must be 0..n-1 in order")
        if not 0 <= layer.source < num_layers:
            raise ValueError(f"layers[{pos}] is source layer {layer.source}, outside 0..{num_layers - 1}")


def plan_map(num_layers: int, entries: Sequence[Entry], warnings: Sequence[str] = ()) -> ExpansionPlan:
    """A `layers` plan from (source, zeroed copy) entries in output order (`layer_map.parse_spec`)."""
    layers = tuple(NewLayer(j, source, zeroed) for j, (source, zeroed) in enumerate(entries))
    return ExpansionPlan(PlanKind.LAYERS, num_layers, layers, warnings=tuple(warnings))


def _lay_out(num_layers: int, copies_after: Mapping[int, Sequence[int]]) -> tuple[NewLayer, ...]:
    """Original layers in order; after original layer i, identity copies of `copies_after[i]` in order."""
    out: list[NewLayer] = []
    for i in range(num_layers):
        out.append(NewLayer(index=len(out), source=i, identity=False))
        for source in copies_after.get(i, ()):
            out.append(NewLayer(index=len(out), source=source, identity=True))
    return tuple(out)


def _layer_span(first: int, last: int) -> str:
    return f"layer {first}" if first == last else f"layers {first}-{last}"


def _plan_every(num_layers: int, every: int, copies: int) -> ExpansionPlan:
    if not 1 <= every <= num_layers:
        raise UsageError(
            f"--every {every} does not fit a checkpoint with {num_layers} layers",
            hint=f"choose N between 1 and {num_layers}; --every N adds one layer per complete group of N",
        )
    if not 1 <= copies <= every:
        raise UsageError(
            f"--copies {copies} does not fit --every {every}",
            hint=f"choose P between 1 and {every}: P copies the top P layers of each group",
        )
    groups = num_layers // every
    # Group g ends at layer (g+1)*N - 1; its top P layers are copied, in order, right after it.
    copies_after = {
        (g + 1) * every - 1: range((g + 1) * every - copies, (g + 1) * every) for g in range(groups)
    }
    warnings: tuple[str, ...] = ()
    if num_layers % every:
        first = groups * every
        warnings = (
            f"--every {every} leaves {_layer_span(first, num_layers - 1)} of {num_layers} in an incomplete "
            f"group; they get no copy",
        )
    return ExpansionPlan(
        kind=PlanKind.EVERY,
        num_layers_in=num_layers,
        layers=_lay_out(num_layers, copies_after),
        every=every,
        copies=copies,
        warnings=warnings,
    )


def _plan_add(num_layers: int, add: int, placement: Placement) -> ExpansionPlan:
    if not 1 <= add <= num_layers:
        raise UsageError(
            f"--add {add} does not fit a checkpoint with {num_layers} layers",
            hint=f"choose K between 1 and {num_layers}",
        )
    warnings: tuple[str, ...] = ()
    copies_after: dict[int, Sequence[int]]
    if placement is Placement.INTERLEAVE:
        # Group g ends at ceil((g+1)·L/K) − 1, in integer arithmetic (floats misround for large L·K).
        # With K ≤ L consecutive ends differ by at least floor(L/K) ≥ 1, so the K ends are distinct and
        # the last is L − 1; when K divides L they are exactly the group ends of --every L/K.
        ends = [-(-((g + 1) * num_layers) // add) - 1 for g in range(add)]
        copies_after = {end: (end,) for end in ends}
    elif placement is Placement.TOP:
        copies_after = {num_layers - 1: range(num_layers - add, num_layers)}
    else:
        copies_after = {add - 1: range(add)}
        warnings = (
            f"--placement bottom stacks all {add} new layers after layer {add - 1}; the paper found new "
            f"blocks at the bottom harmful (interleave works best)",
        )
    layers = _lay_out(num_layers, copies_after)
    return ExpansionPlan(PlanKind.ADD, num_layers, layers, add=add, placement=placement, warnings=warnings)


def _plan_after(num_layers: int, after: Sequence[int]) -> ExpansionPlan:
    if not after:
        raise UsageError("--after needs at least one layer index", hint="e.g. --after 3,7,11")
    for index in after:
        if not 0 <= index < num_layers:
            raise UsageError(
                f"--after {index} is out of range for a checkpoint with {num_layers} layers",
                hint=f"layer indices are 0-based: 0 to {num_layers - 1}",
            )
    counts = Counter(after)
    # A repeated index gets as many copies as it is repeated, all right after it.
    copies_after = {index: (index,) * n for index, n in counts.items()}
    layers = _lay_out(num_layers, copies_after)
    return ExpansionPlan(PlanKind.AFTER, num_layers, layers, after=tuple(sorted(after)))


def _as_placement(placement: Placement | str) -> Placement:
    try:
        return Placement(placement)
    except ValueError:
        raise UsageError(
            f"unknown placement {placement!r}", hint="choose interleave, top or bottom"
        ) from None


def plan_expansion(
    num_layers: int,
    *,
    every: int | None = None,
    copies: int | None = None,
    after: Sequence[int] | None = None,
    add: int | None = None,
    placement: Placement | str = Placement.INTERLEAVE,
) -> ExpansionPlan:
    """Turn exactly one of `every` / `after` / `add` into the layout of the expanded model.

    Raises `UsageError` (exit 2) for options that contradict each other or do not fit `num_layers`.
    """
    where = _as_placement(placement)
    if num_layers < 1:
        raise UsageError(
            f"a checkpoint with {num_layers} layers cannot be expanded",
            hint="the config's layer count must be at least 1",
        )
    # Options that belong to another mode first: `--copies 2` alone is better told that than "choose one".
    if copies is not None and every is None:
        raise UsageError("--copies only applies to --every", hint="e.g. --every 8 --copies 2")
    if where is not Placement.INTERLEAVE and add is None:
        raise UsageError(
            f"--placement {where.value} only applies to --add", hint=f"e.g. --add 8 --placement {where.value}"
        )
    given = [
        name for name, value in (("--every", every), ("--after", after), ("--add", add)) if value is not None
    ]
    if len(given) != 1:
        message = (
            "choose one of --every, --after or --add" if not given else f"{' and '.join(given)} conflict"
        )
        raise UsageError(message, hint="e.g. --every 4 turns 32 layers into 40 (the LLaMA Pro recipe)")
    if every is not None:
        plan = _plan_every(num_layers, every, 1 if copies is None else copies)
    elif add is not None:
        plan = _plan_add(num_layers, add, where)
    else:
        plan = _plan_after(num_layers, after or ())  # `after` is the one option given
    if not plan.new_indices:
        # Unreachable with the range checks above; kept so a future option cannot silently produce a no-op.
        raise UsageError(f"the plan adds no layer to a checkpoint with {num_layers} layers")
    return plan


def plan_options(plan: ExpansionPlan | Mapping[str, Any]) -> str:
    """The shortest `expand` (or `relayer`) options that reproduce a plan, defaults left out: `--every 4`,
    `--every 4 --copies 2`, `--after 3,7,7`, `--add 8`, `--add 8 --placement top`, `--layers 0-23,8-31`.

    Takes the plan or its llamapro.json `"plan"` object (`to_record()`), so `inspect`, `expand`'s report
    and the model card say the same words about the same plan. A record's fields are read defensively:
    this only describes a record, whoever validated it.
    """
    record = plan.to_record() if isinstance(plan, ExpansionPlan) else plan
    kind = record.get("kind")
    if kind == PlanKind.LAYERS:
        return f"--layers {record.get('spec')}"
    if kind == PlanKind.EVERY:
        copies = record.get("copies")
        return f"--every {record.get('every')}" + (f" --copies {copies}" if copies not in (None, 1) else "")
    if kind == PlanKind.AFTER:
        after = record.get("after")
        return "--after " + ",".join(map(str, after if isinstance(after, list | tuple) else ()))
    placement = record.get("placement")
    default = placement in (None, Placement.INTERLEAVE)
    return f"--add {record.get('add')}" + ("" if default else f" --placement {placement}")
