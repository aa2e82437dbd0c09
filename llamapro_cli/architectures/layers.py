"""The per-layer engine: what a config says about each layer, through its family record.

`effective_values` gives one per-layer field's values (explicit in the config, else the record's ported
formula); from those come `layer_kinds` (the words `inspect` shows), `layer_signature` (the per-layer
behaviour `verify-identity` compares between a copy and its source) and `pattern_warnings` (explicit
lists that no longer follow the index pattern engines may re-derive). `rewrite.py` uses the same
helpers to write the expanded config.

Invariant: only configs `family_for` accepted reach here (every value a record reads has its declared
kind); a list of the wrong length is still refused here (exit 3), as only here is the count known.
Must not: branch per family, read files, import torch or transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llamapro_cli.architectures.record import Config, Family, FieldKind, LayerField
from llamapro_cli.architectures.registry import COMPAT_DOC, fields_of, num_layers
from llamapro_cli.errors import UnsupportedError


def effective_values(fld: LayerField, config: Config, n: int) -> list[Any] | None:
    """Per-layer values of one field for an n-layer config (explicit, else derived, else None)."""
    raw = config.get(fld.key)
    if fld.derive_always or raw is None or (fld.empty_is_absent and raw == []):
        return fld.derive(config, n) if fld.derive else None
    if fld.kind is FieldKind.LIST:
        if not isinstance(raw, list) or len(raw) != n:
            raise UnsupportedError(f"config.json: {fld.key} has {_length(raw)} entries for {n} layers")
        return list(raw)
    if fld.kind is FieldKind.PATTERN:
        if not isinstance(raw, str) or len(raw) != n:
            raise UnsupportedError(f"config.json: {fld.key} is not a string of one character per layer")
        return list(raw)
    if fld.kind is FieldKind.INDEX_SET:
        if not isinstance(raw, list) or not all(isinstance(i, int) for i in raw):
            raise UnsupportedError(f"config.json: {fld.key} is not a list of layer indices")
        members = set(raw)
        return [i in members for i in range(n)]
    if not isinstance(raw, int) or isinstance(raw, bool):
        raise UnsupportedError(f"config.json: {fld.key} is not an integer")
    return [i < raw for i in range(n)]


def _length(value: Any) -> str:
    return str(len(value)) if isinstance(value, list) else "no list of"


def is_active(fld: LayerField, sub: Config) -> bool:
    """Whether a field describes this config (present, or a family formula that always applies)."""
    return fld.kind is FieldKind.VIRTUAL or fld.key in sub or fld.write_when_absent


def _columns(family: Family, config: Config) -> list[tuple[LayerField, list[Any]]] | None:
    sub = family.sub_config(config)
    n = num_layers(family, config)
    if n is None:
        return None
    out = []
    for fld in fields_of(family):
        values = effective_values(fld, sub, n) if is_active(fld, sub) else None
        if values is not None:
            out.append((fld, values))
    return out


def layer_kinds(family: Family, config: Config) -> list[str] | None:
    """A short per-layer kind (attention type, dense/moe, rope/nope, mixer) for families with kinds."""
    columns = [(f, v) for f, v in _columns(family, config) or () if f.label is not None]
    if not columns:
        return None
    n = len(columns[0][1])
    return [" ".join(f.label(v[i]) for f, v in columns if f.label) for i in range(n)]


def layer_signature(family: Family, config: Config) -> list[tuple[Any, ...]] | None:
    """Per-layer behaviour tuple (one value per known field) used to compare a copy with its source."""
    columns = _columns(family, config)
    if columns is None:
        return None
    n = num_layers(family, config) or 0
    return [tuple(values[i] for _, values in columns) for i in range(n)]


def pattern_warnings(family: Family, config: Config) -> list[str]:
    """Warnings for explicit per-layer lists that no longer follow the family's periodic index pattern."""
    sub = family.sub_config(config)
    n = num_layers(family, config)
    out: list[str] = []
    for fld in fields_of(family):
        if n is None or not fld.periodic or fld.derive is None or sub.get(fld.key) in (None, []):
            continue
        values = effective_values(fld, sub, n)
        formula = fld.derive(without_key(sub, fld.key), n)
        if values is not None and values != formula:
            out.append(pattern_message(family, fld, [j for j in range(n) if values[j] != formula[j]]))
    return out


def pattern_message(family: Family, fld: LayerField, layers: list[int]) -> str:
    """The warning for explicit values of `fld` that differ from its index pattern at `layers`."""
    return (
        f"{fld.key}: layers {short_list(layers)} break {family.name}'s periodic layer pattern; exact in "
        "engines that read the explicit list (transformers), but engines or converters that derive "
        f"per-layer behaviour from the index would run a different model (see {COMPAT_DOC})"
    )


def short_list(values: Sequence[int]) -> str:
    """At most eight values, comma-separated, then an ellipsis."""
    return ", ".join(map(str, values[:8])) + (", …" if len(values) > 8 else "")


def without_key(sub: Config, key: str) -> dict[str, Any]:
    """The config without one key: what the formula alone would derive."""
    return {k: v for k, v in sub.items() if k != key}
