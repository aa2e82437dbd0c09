"""The freeze map's JSON document (`freeze-map --format json`), read back and validated in one place.

`load_manifest()` turns the document (a file, read bounded, or the parsed JSON) back into the
`FreezeMap` it was written from. A manifest is a file: edited by hand, truncated, written by another
version, or hostile. Every field is type- and range-checked here (integers are integers, never floats,
`Infinity` or booleans; shapes are bounded), and the fields are checked against each other the way
`freeze_map()` derives them: `trainable` and `frozen` split `tensors`, the counts and sizes add up, the
trainable keys are exactly the new layers' tensors plus the `--also` roles, every layer has the tensors
its family requires, a copy has its source's tensors, and digests are all present or all absent. What
is wrong is one `InputError` (exit 3) naming the field; whether the new layers really are new is checked
against the weights by the audit (`claims.py`).

Invariant: `load_manifest(to_jsonable(fm)) == fm` for every map `freeze_map()` returns; nothing past this
module sees an unvalidated manifest. Must not: print, read tensor data.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llamapro_cli.architectures.families import FAMILIES
from llamapro_cli.architectures.record import Family
from llamapro_cli.errors import InputError
from llamapro_cli.freeze.map import MANIFEST_KIND, MANIFEST_SCHEMA, FreezeMap, Role, TensorEntry, role_keys
from llamapro_cli.io.files import read_json
from llamapro_cli.io.header import DTYPE_BITS

MAX_DIM = 2**63 - 1  # safetensors sizes are u64 byte offsets: no real dimension is larger
MAX_LAYERS = 100_000
_HEX64 = re.compile(r"[0-9a-f]{64}")
_INDEX = re.compile(r"0|[1-9][0-9]{0,8}")


class ManifestError(InputError):
    """A manifest that is not what `freeze-map --format json` writes (exit 3)."""


def load_manifest(source: str | Path | Mapping[str, Any]) -> FreezeMap:
    """A `FreezeMap` from its JSON (a path or the parsed document), as `--format json` wrote it."""
    where = str(source) if not isinstance(source, Mapping) else "manifest"
    data: Any = source
    if not isinstance(source, Mapping):
        path = Path(source)
        if not path.exists():
            raise InputError(f"{where}: no such file")
        data, _ = read_json(path, "the freeze-map manifest")
    if not isinstance(data, Mapping) or data.get("kind") != MANIFEST_KIND:
        raise InputError(
            f"{where}: not a llamapro freeze-map manifest",
            hint="write one with: llamapro freeze-map EXPANDED --format json > map.json",
        )
    if not _is_int(data.get("schema_version")) or data["schema_version"] != MANIFEST_SCHEMA:
        raise InputError(f"{where}: manifest schema_version {data.get('schema_version')!r} is not supported")
    fm = _Fields(data, where).freeze_map()
    check_consistent(fm, where)
    return fm


class _Fields:
    """Typed reads of the document's fields; the first wrong one is a `ManifestError` naming it."""

    def __init__(self, data: Mapping[str, Any], where: str) -> None:
        self.data, self.where = data, where

    def fail(self, key: str, what: str) -> ManifestError:
        return ManifestError(f"{self.where}: malformed manifest ({key} {what})")

    def get(self, key: str) -> Any:
        if key not in self.data:
            raise self.fail(key, "is missing")
        return self.data[key]

    def string(self, key: str, value: Any = None) -> str:
        value = self.get(key) if value is None else value
        if not isinstance(value, str) or not value:
            raise self.fail(key, "is not a non-empty string")
        return value

    def count(self, key: str, value: Any = None, *, top: int = MAX_DIM) -> int:
        value = self.get(key) if value is None else value
        if not _is_int(value) or not 0 <= value <= top:
            raise self.fail(key, f"is not an integer from 0 to {top}")
        return int(value)

    def array(self, key: str) -> list[Any]:
        value = self.get(key)
        if not isinstance(value, list | tuple):
            raise self.fail(key, "is not a list")
        return list(value)

    def strings(self, key: str) -> tuple[str, ...]:
        items = self.array(key)
        if not all(isinstance(x, str) for x in items) or len(set(items)) != len(items):
            raise self.fail(key, "is not a list of distinct strings")
        return tuple(items)

    def layers(self, key: str, num_layers: int) -> tuple[int, ...]:
        return tuple(self.count(key, x, top=num_layers - 1) for x in self.array(key))

    def tensors(self) -> dict[str, TensorEntry]:
        table = self.get("tensors")
        if not isinstance(table, Mapping) or not table:
            raise self.fail("tensors", "is not a non-empty object of tensor name -> entry")
        return {self.string("tensors", name): self.entry(name, t) for name, t in table.items()}

    def entry(self, name: str, t: Any) -> TensorEntry:
        key = f"tensors[{name!r}]"
        if not isinstance(t, Mapping):
            raise self.fail(key, "is not an object")
        shape = t.get("shape")
        if not isinstance(shape, list | tuple) or len(shape) > 16:
            raise self.fail(f"{key}.shape", "is not a list of at most 16 dimensions")
        if t.get("dtype") not in DTYPE_BITS:
            raise self.fail(f"{key}.dtype", "is not a safetensors dtype")
        parameter, sha = t.get("parameter"), t.get("sha256")
        if not (parameter is None or (isinstance(parameter, str) and parameter)):
            raise self.fail(f"{key}.parameter", "is neither a name nor null")
        if not (sha is None or (isinstance(sha, str) and _HEX64.fullmatch(sha))):
            raise self.fail(f"{key}.sha256", "is neither a sha256 hex digest nor null")
        dims = tuple(self.count(f"{key}.shape", d) for d in shape)
        return TensorEntry(dtype=t["dtype"], shape=dims, parameter=parameter, sha256=sha)

    def freeze_map(self) -> FreezeMap:
        num_layers = self.count("num_layers", top=MAX_LAYERS)
        new_layers = self.layers("new_layers", num_layers)
        sources = None if self.get("sources") is None else self.layers("sources", num_layers)
        algorithm = self.get("digest_algorithm")
        if algorithm not in (None, "sha256"):
            raise self.fail("digest_algorithm", "is neither sha256 nor null")
        if not isinstance(self.get("tied_embeddings"), bool):
            raise self.fail("tied_embeddings", "is not true or false")
        return FreezeMap(
            schema_version=MANIFEST_SCHEMA,
            kind=MANIFEST_KIND,
            checkpoint=self.string("checkpoint"),
            architecture=self.string("architecture"),
            num_layers=num_layers,
            new_layers=new_layers,
            sources=sources,
            found_by=self.string("found_by"),
            layer_prefix=self.string("layer_prefix"),
            memory_prefix=self.string("memory_prefix"),
            also=self.strings("also"),
            tied_embeddings=self.data["tied_embeddings"],
            trainable=self.strings("trainable"),
            frozen=self.strings("frozen"),
            trainable_parameters=self.strings("trainable_parameters"),
            frozen_parameters=self.strings("frozen_parameters"),
            trainable_tensors=self.count("trainable_tensors"),
            frozen_tensors=self.count("frozen_tensors"),
            trainable_numel=self.count("trainable_numel", top=2**128),
            frozen_numel=self.count("frozen_numel", top=2**128),
            digest_algorithm=algorithm,
            tensors=self.tensors(),
            notes=self.strings("notes") if "notes" in self.data else (),
        )


def check_consistent(fm: FreezeMap, where: str = "the freeze map") -> None:
    """The fields agree with each other as `freeze_map()` derives them (each check names what fails)."""

    def fail(what: str) -> ManifestError:
        return ManifestError(f"{where}: inconsistent manifest ({what})")

    family = manifest_family(fm, where)
    if set(fm.trainable) & set(fm.frozen) or set(fm.trainable) | set(fm.frozen) != set(fm.tensors):
        raise fail("trainable and frozen do not split tensors")
    if (fm.trainable_tensors, fm.frozen_tensors) != (len(fm.trainable), len(fm.frozen)):
        raise fail("the tensor counts do not match the lists")
    numel = {n: _numel(e.shape) for n, e in fm.tensors.items()}
    sides = [
        ("trainable", fm.trainable, fm.trainable_parameters, fm.trainable_numel),
        ("frozen", fm.frozen, fm.frozen_parameters, fm.frozen_numel),
    ]
    for side, keys, params, values in sides:
        if values != sum(numel[k] for k in keys):
            raise fail(f"{side}_numel is not the size of the {side} tensors")
        if params != tuple(dict.fromkeys(p for k in keys if (p := fm.tensors[k].parameter) is not None)):
            raise fail(f"{side}_parameters are not the parameters of the {side} tensors")
    if len(set(fm.new_layers)) != len(fm.new_layers):
        raise fail("new_layers names a layer twice")
    if fm.sources is not None and len(fm.sources) != len(fm.new_layers):
        raise fail("sources does not have one entry per new layer")
    if (fm.digest_algorithm is None) != all(e.sha256 is None for e in fm.tensors.values()) or (
        fm.digest_algorithm is not None and any(e.sha256 is None for e in fm.tensors.values())
    ):
        raise fail("digests must be recorded for every tensor or for none")
    _check_trainable(fm, family, fail)
    _check_layers(fm, family, fail)


def manifest_family(fm: FreezeMap, where: str) -> Family:
    """The architecture record the manifest names, in the on-disk layout its tensor names use."""
    family = next((f for f in FAMILIES if f.name == fm.architecture), None)
    if family is None:
        raise ManifestError(f"{where}: manifest architecture {fm.architecture!r} is not one llamapro knows")
    family = family.for_checkpoint(fm.tensors)
    if family.layer_prefix != fm.layer_prefix:
        raise ManifestError(f"{where}: manifest layer_prefix {fm.layer_prefix!r} is not {family.name}'s")
    return family


def _check_trainable(fm: FreezeMap, family: Family, fail: Any) -> None:
    """Trainable = every tensor of the new layers, plus the `also` roles' tensors (nothing else)."""
    try:
        roles = [Role(r) for r in fm.also]
    except ValueError:
        raise fail(f"also names a role other than {', '.join(r.value for r in Role)}") from None
    allowed = {k for r in roles for k in role_keys(family, r, tied=fm.tied_embeddings) if k in fm.tensors}
    new = {k for k in fm.tensors if _layer(fm.layer_prefix, k) in set(fm.new_layers)}
    if set(fm.trainable) != new | allowed or not new:
        raise fail("trainable is not the new layers' tensors plus the --also roles")


def _check_layers(fm: FreezeMap, family: Family, fail: Any) -> None:
    """Every layer has the tensors its family requires, and each copy the same names as its source (a
    tensor deleted from both a layer and the lists would otherwise escape the audit)."""
    blocks: dict[int, set[str]] = {}
    for key in fm.tensors:
        index = _layer(fm.layer_prefix, key)
        if index is not None:
            blocks.setdefault(index, set()).add(key[len(f"{fm.layer_prefix}{index}.") :])
    if set(blocks) != set(range(fm.num_layers)):
        raise fail(f"the tensors do not hold exactly layers 0 to {fm.num_layers - 1}")
    for index, rels in blocks.items():
        missing = next((p for p in family.required if not any(re.fullmatch(p, r) for r in rels)), None)
        if missing is not None:
            raise fail(f"layer {index} has no tensor matching {missing}")
    # sources index the layers of the checkpoint that was expanded: the non-new layers, in order.
    originals = [j for j in sorted(blocks) if j not in set(fm.new_layers)]
    for copy, source in zip(fm.new_layers, fm.sources or (), strict=False):
        if source >= len(originals) or blocks[copy] != blocks[originals[source]]:
            raise fail(f"new layer {copy} does not have the tensors of its source layer")


def _layer(prefix: str, key: str) -> int | None:
    if not key.startswith(prefix):
        return None
    head = key[len(prefix) :].split(".", 1)[0]
    return int(head) if _INDEX.fullmatch(head) else None


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for d in shape:
        total *= d
    return total


def _is_int(value: object) -> bool:
    return type(value) is int  # not bool, not float (json reads Infinity and 1e400 as floats)
