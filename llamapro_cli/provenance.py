"""`llamapro.json`, the contract between expand, verify-identity, freeze-map and verify-frozen.

Owns `Provenance` (schema v1, design.md §3; v2 for `relayer` layer maps) as a frozen dataclass:
`Provenance.from_json()` is the one place a record read from disk is validated, `to_json()` the one place
one is written, so every reader works with typed fields and nobody reads the record by string keys. A
re-expansion nests the previous record as `parent`; `generations()` walks them, newest first. Schema v2
differs from v1 only in its plan, `{"kind": "layers", "spec": SPEC}`, whose layers may repeat, drop or
reorder the source's: a v1 reader assumes every source layer once and in order, so it must not take one.
Both may carry `config_replaced` (the input's values of the config keys the run rewrote), written only
when the rewrite changed more than the layer count; older readers keep it as an unknown key.

Invariant: `from_json(p.to_json()) == p`, and `to_json()` keeps the v1 key order and values, so the bytes
on disk are exactly schema v1 (v2 for a `layers` plan). Keys a later or foreign writer added are kept
(`extra`) and written back.
Must not: read files (the caller reads them, bounded) or decide exit codes beyond `InputError`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from llamapro_cli.config_replaced import ReplacedKeys, replaced_from_json
from llamapro_cli.plan import ExpansionPlan, NewLayer, PlanKind

SCHEMA_VERSION = 1
LAYERS_SCHEMA_VERSION = 2  # the record of a `layers` plan (relayer): the only change from v1
ALGORITHM = "sha256"


class RecordError(ValueError):
    """What is wrong with a record, in a few words (the reader adds the file name)."""


@dataclass(frozen=True)
class SourceRecord:
    """Where the expanded checkpoint came from."""

    path: str | None
    repo_id: str | None
    revision: str | None
    config_sha256: str | None
    architecture: str | None
    num_layers: int


@dataclass(frozen=True)
class PlanRecord:
    """The options that produced the plan, as `ExpansionPlan.to_record()` writes them."""

    kind: str
    every: int | None = None
    copies: int | None = None
    after: tuple[int, ...] | None = None
    add: int | None = None
    placement: str | None = None
    spec: str | None = None  # a `layers` plan's canonical SPEC (schema v2)

    @classmethod
    def of(cls, plan: ExpansionPlan) -> PlanRecord:
        record = plan.to_record()
        after = record.get("after")
        return cls(**{**record, "after": tuple(after) if after is not None else None})

    def to_json(self) -> dict[str, Any]:
        if self.kind == PlanKind.LAYERS:
            return {"kind": self.kind, "spec": self.spec}
        return {
            "kind": self.kind,
            "every": self.every,
            "copies": self.copies,
            "after": list(self.after) if self.after is not None else None,
            "add": self.add,
            "placement": self.placement,
        }


@dataclass(frozen=True)
class Digests:
    """sha256 of every tensor of the expanded checkpoint (`expand --digests`), by checkpoint key."""

    algorithm: str
    tensors: Mapping[str, str] | None  # None: not a table (the readers that need it refuse it)


@dataclass(frozen=True)
class Provenance:
    """One generation of `llamapro.json` (and, through `parent`, every earlier one)."""

    source: SourceRecord
    plan: PlanRecord
    layers: tuple[NewLayer, ...]
    schema_version: int = SCHEMA_VERSION
    tool: str | None = None
    created: str | None = None
    command: str | None = None
    layer_prefix: str | None = None
    num_layers: int | None = None
    zeroed: tuple[str, ...] = ()
    # The config keys this run's rewrite changed, with the input's values (config_replaced.py); `()`
    # when only the layer count changed, and then not written, so such records keep their v1 bytes.
    config_replaced: tuple[ReplacedKeys, ...] = ()
    digests: Digests | None = None
    parent: Provenance | None = None
    extra: tuple[tuple[str, Any], ...] = ()

    @property
    def new_layers(self) -> tuple[int, ...]:
        """Indices of this generation's identity copies."""
        return tuple(layer.index for layer in self.layers if layer.identity)

    def generations(self) -> Iterator[Provenance]:
        """This record, then its parent, grandparent, …"""
        record: Provenance | None = self
        while record is not None:
            yield record
            record = record.parent

    def expansion_plan(self) -> ExpansionPlan:
        """The layer plan this generation records; `ValueError` when the layout is inconsistent."""
        plan = self.plan
        return ExpansionPlan.from_layers(
            self.source.num_layers,
            self.layers,
            kind=plan.kind,
            every=plan.every,
            copies=plan.copies,
            after=plan.after,
            add=plan.add,
            placement=plan.placement,
            spec=plan.spec,
        )

    def to_json(self) -> dict[str, Any]:
        src = self.source
        doc: dict[str, Any] = {
            "schema_version": self.schema_version,
            "tool": self.tool,
            "created": self.created,
            "command": self.command,
            "source": {
                "path": src.path,
                "repo_id": src.repo_id,
                "revision": src.revision,
                "config_sha256": src.config_sha256,
                "architecture": src.architecture,
                "num_layers": src.num_layers,
            },
            "plan": self.plan.to_json(),
            "layer_prefix": self.layer_prefix,
            "num_layers": self.num_layers,
            "layers": [{"index": x.index, "source": x.source, "identity": x.identity} for x in self.layers],
            "zeroed": list(self.zeroed),
        }
        if self.config_replaced:
            doc["config_replaced"] = [entry.to_json() for entry in self.config_replaced]
        doc["digests"] = (
            None
            if self.digests is None
            else {"algorithm": self.digests.algorithm, "tensors": dict(self.digests.tensors or {})}
        )
        doc["parent"] = None if self.parent is None else self.parent.to_json()
        doc.update(self.extra)
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> Provenance:
        """Validate a parsed record (and every nested parent); `RecordError` says what is wrong."""
        if not isinstance(doc, dict) or not _is_int(doc.get("schema_version")):
            raise RecordError("not a llamapro provenance record (no schema_version)")
        if doc["schema_version"] > LAYERS_SCHEMA_VERSION:
            raise RecordError(
                f"llamapro.json schema_version {doc['schema_version']} is newer than this llamapro reads "
                f"(1 and {LAYERS_SCHEMA_VERSION}); upgrade llamapro"
            )
        try:
            return _generation(doc)
        except RecordError as e:
            raise RecordError(f"malformed llamapro provenance record ({e})") from None


_KNOWN = (
    "schema_version",
    "tool",
    "created",
    "command",
    "source",
    "plan",
    "layer_prefix",
    "num_layers",
    "layers",
    "zeroed",
    "config_replaced",
    "digests",
    "parent",
)


def _generation(doc: Any) -> Provenance:
    if not isinstance(doc, dict):
        raise RecordError("a parent record is not an object")
    layers = doc.get("layers")
    if not isinstance(layers, list) or not all(_layer_entry_ok(x) for x in layers):
        raise RecordError("layers is not a list of {index, source, identity} entries")
    for key in ("source", "plan"):
        if not isinstance(doc.get(key), dict):
            raise RecordError(f"{key} is not an object")
    if not _is_int(doc["source"].get("num_layers")):
        raise RecordError("source.num_layers is not an integer")
    if not isinstance(doc.get("digests"), dict | None) or not isinstance(doc.get("parent"), dict | None):
        raise RecordError("digests or parent is neither an object nor null")
    return Provenance(
        schema_version=doc.get("schema_version", SCHEMA_VERSION),
        tool=_optional(doc, "tool", str),
        created=_optional(doc, "created", str),
        command=_optional(doc, "command", str),
        source=_source(doc["source"]),
        plan=_plan(doc["plan"]),
        layer_prefix=_optional(doc, "layer_prefix", str),
        num_layers=_optional(doc, "num_layers", int),
        layers=tuple(NewLayer(x["index"], x["source"], x["identity"]) for x in layers),
        zeroed=_names(doc.get("zeroed")),
        config_replaced=_replaced(doc.get("config_replaced")),
        digests=_digests(doc.get("digests")),
        parent=None if doc.get("parent") is None else _generation(doc["parent"]),
        extra=tuple((k, v) for k, v in doc.items() if k not in _KNOWN),
    )


def _source(src: dict[str, Any]) -> SourceRecord:
    return SourceRecord(
        path=_optional(src, "path", str, "source."),
        repo_id=_optional(src, "repo_id", str, "source."),
        revision=_optional(src, "revision", str, "source."),
        config_sha256=_optional(src, "config_sha256", str, "source."),
        architecture=_optional(src, "architecture", str, "source."),
        num_layers=src["num_layers"],
    )


def _plan(plan: dict[str, Any]) -> PlanRecord:
    kind = plan.get("kind")
    if not isinstance(kind, str):
        raise RecordError("plan.kind is not a string")
    after = plan.get("after")
    if after is not None and (not isinstance(after, list) or not all(_is_int(i) for i in after)):
        raise RecordError("plan.after is neither a list of integers nor null")
    return PlanRecord(
        kind=kind,
        every=_optional(plan, "every", int, "plan."),
        copies=_optional(plan, "copies", int, "plan."),
        after=tuple(after) if after is not None else None,
        add=_optional(plan, "add", int, "plan."),
        placement=_optional(plan, "placement", str, "plan."),
        spec=_optional(plan, "spec", str, "plan."),
    )


def _digests(value: dict[str, Any] | None) -> Digests | None:
    # Their content (algorithm, which tensors) is checked against the checkpoint by the readers that use
    # them; here only the shape a reader can rely on.
    if not value:
        return None
    tensors = value.get("tensors")
    algorithm = value.get("algorithm")
    if not isinstance(tensors, dict):
        return Digests(algorithm=str(algorithm), tensors=None)
    return Digests(algorithm=str(algorithm), tensors={str(k): str(v) for k, v in tensors.items()})


def _replaced(value: Any) -> tuple[ReplacedKeys, ...]:
    if value is None:
        return ()
    try:
        return replaced_from_json(value)
    except ValueError as e:
        raise RecordError(str(e)) from None


def _names(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise RecordError("zeroed is not a list of tensor names")
    return tuple(value)


def _optional(doc: Mapping[str, Any], key: str, kind: type, where: str = "") -> Any:
    value = doc.get(key)
    if value is None:
        return None
    if (kind is int and not _is_int(value)) or (kind is not int and not isinstance(value, kind)):
        raise RecordError(f"{where}{key} is not {'an integer' if kind is int else 'a string'}")
    return value


def _layer_entry_ok(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and _is_int(entry.get("index"))
        and _is_int(entry.get("source"))
        and type(entry.get("identity")) is bool
    )


def _is_int(value: object) -> bool:
    return type(value) is int
