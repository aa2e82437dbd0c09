"""What a config rewrite replaced: the keys it changed, added or removed, and putting them back.

`expand` and `relayer` edit config.json (architectures/rewrite.py): the layer count, every per-layer
field, derivation fields made explicit or constant, layer-indexed quantization names. `replaced_keys()`
compares the config before and after and keeps, for every JSON object on the way to the family's
(sub-)config, each changed key's original value (in the original's key order) and each added key's
name; the layer count's value is left out, because the record's plan gives it. `llamapro.json` stores
the result as `config_replaced` (provenance.py), so `relayer --drop-new` can give back the base's
config.json value for value (`put_back()`), even where the base left per-layer fields to a formula.

Invariant: `put_back(new, replaced_keys(old, new, path, count))` equals `old` in every key but the
count, in key order too where the rewrite kept a key in place (it never moves one); values are compared
as JSON (`1`, `1.0` and `true` differ). `replaced_from_json` reads back exactly what `to_json` wrote.
Must not: read files, know about families (the caller passes the path and the count key), or import
anything of this package.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ENTRY_KEYS = ("path", "values", "absent")


@dataclass(frozen=True)
class ReplacedKeys:
    """One JSON object of config.json whose keys a rewrite changed.

    `path`: the keys leading to it from the top (`()` the top level, `("text_config",)`); `values`: each
    changed or removed key with its value before the rewrite, in the original's key order; `absent`:
    the keys the rewrite added (the original had none)."""

    path: tuple[str, ...]
    values: tuple[tuple[str, Any], ...]
    absent: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"path": list(self.path), "values": dict(self.values), "absent": list(self.absent)}


def replaced_keys(
    old: Mapping[str, Any], new: Mapping[str, Any], path: Sequence[str], count_key: str
) -> tuple[ReplacedKeys, ...]:
    """What turning config `old` into `new` replaced, object by object down `path`; `()` when only
    `count_key` (in the object at the end of `path`) changed value."""
    out: list[ReplacedKeys] = []
    for depth in range(len(path) + 1):
        old_obj, new_obj = _walk(old, path[:depth]), _walk(new, path[:depth])
        if old_obj is None or new_obj is None:
            break  # an object missing on one side was compared whole one level up
        inner = path[depth] if depth < len(path) else None
        if inner is not None and (_walk(old_obj, (inner,)) is None or _walk(new_obj, (inner,)) is None):
            inner = None  # not an object on both sides: compare it here, as a value
        values = [
            (key, value)
            for key, value in old_obj.items()
            if key != inner
            and not (inner is None and depth == len(path) and key == count_key and key in new_obj)
            and (key not in new_obj or not same(value, new_obj[key]))
        ]
        absent = [key for key in new_obj if key not in old_obj]
        if values or absent:
            out.append(ReplacedKeys(tuple(path[:depth]), tuple(values), tuple(absent)))
        if inner is None:
            break
    return tuple(out)


def put_back(config: Mapping[str, Any], replaced: Sequence[ReplacedKeys]) -> dict[str, Any]:
    """A copy of `config` with every recorded key's value put back and every added key removed.

    A key the rewrite changed keeps its place; one it removed (none does today) comes back at the end of
    its object. `ValueError` when a recorded path does not lead to an object of `config`."""
    out: dict[str, Any] = json.loads(json.dumps(config))
    for entry in replaced:
        obj = _walk(out, entry.path)
        if obj is None:
            raise ValueError(f"config.json has no object at {'.'.join(entry.path) or 'the top level'}")
        for key in entry.absent:
            obj.pop(key, None)
        for key, value in entry.values:
            obj[key] = json.loads(json.dumps(value))
    return out


def same(a: Any, b: Any) -> bool:
    """Equal as JSON text: types (`1`, `1.0`, `true`) and key order count."""
    return json.dumps(a) == json.dumps(b)


def replaced_from_json(doc: Any) -> tuple[ReplacedKeys, ...]:
    """The `config_replaced` list of a record; `ValueError` says what is wrong with it."""
    if not isinstance(doc, list):
        raise ValueError("config_replaced is not a list")
    entries = tuple(_entry(i, item) for i, item in enumerate(doc))
    paths = [e.path for e in entries]
    if len(set(paths)) != len(paths):
        raise ValueError("config_replaced lists one path twice")
    return entries


def _entry(i: int, item: Any) -> ReplacedKeys:
    where = f"config_replaced[{i}]"
    if not isinstance(item, dict) or sorted(item) != sorted(ENTRY_KEYS):
        raise ValueError(f"{where} is not an object of exactly {', '.join(ENTRY_KEYS)}")
    path, values, absent = item["path"], item["values"], item["absent"]
    if not _strings(path):
        raise ValueError(f"{where}.path is not a list of key names")
    if not isinstance(values, dict):
        raise ValueError(f"{where}.values is not an object")
    if not _strings(absent) or len(set(absent)) != len(absent):
        raise ValueError(f"{where}.absent is not a list of distinct key names")
    if set(values) & set(absent):
        raise ValueError(f"{where} lists a key both in values and in absent")
    return ReplacedKeys(tuple(path), tuple(values.items()), tuple(absent))


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(x, str) for x in value)


def _walk(config: Any, path: Sequence[str]) -> dict[str, Any] | None:
    for key in path:
        config = config.get(key) if isinstance(config, Mapping) else None
    return config if isinstance(config, dict) else None
