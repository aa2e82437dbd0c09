"""The types a model-family record is made of: `Family`, `LayerField`, `Formula`, `ConfigKey`, `Roles`.

A record (one per family, in `families.py`) says where a family's decoder blocks live in the checkpoint,
which tensors of a copied block must be zeroed so the copy is an exact identity, which tensors every
block must have, which config fields decide per-layer behaviour (with transformers' formula for configs
that leave them out) and which config keys those formulas and refusals read, each with the type and
range it must have. This module also owns the one parser of layer-indexed tensor names
(`split_layer_name`), so every reader agrees on what `model.layers.7.` means.

Invariant: values only (frozen dataclasses, enums) and the checks on single values they declare.
Must not: hold records or per-family knowledge, read files, import torch or transformers, or import
anything of this package but `errors`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum, StrEnum
from typing import Any

from llamapro_cli.errors import InputError

Config = Mapping[str, Any]

# A layer index in a tensor name: ASCII digits, no leading zero, at most 6 of them (a million layers).
# `\d` would also take Unicode digits, `$` a trailing newline, and int() of 5000 digits raises.
MAX_INDEX_DIGITS = 6
_LAYER_NAME = re.compile(rf"(0|[1-9][0-9]{{0,{MAX_INDEX_DIGITS - 1}}})\.(.+)", re.DOTALL)


def split_layer_name(name: str, prefix: str) -> tuple[int, str] | None:
    """(layer index, block-relative name) of a tensor under `prefix`; None for a name outside it.

    A name under the prefix must be `{prefix}{index}.{rest}` with a canonical index (what transformers
    writes: `str(i)`) and a printable rest; anything else is refused (exit 3) naming the tensor, because
    two spellings of one index, or a name that only looks like a layer, would be read as another tensor.
    """
    if not name.startswith(prefix):
        return None
    m = _LAYER_NAME.fullmatch(name, len(prefix))
    if m is None or not m.group(2).isprintable():
        shown = json.dumps(name)
        raise InputError(
            f"tensor {shown if len(shown) <= 120 else shown[:117] + '...'}: malformed layer name (expected "
            f"{prefix}<index>.<name>: an index of at most {MAX_INDEX_DIGITS} ASCII digits without leading "
            "zeros, a printable name)"
        )
    return int(m.group(1)), m.group(2)


def layer_index(name: str, prefix: str) -> int | None:
    """The layer index of a tensor under `prefix` (None outside it); see `split_layer_name`."""
    parts = split_layer_name(name, prefix)
    return None if parts is None else parts[0]


# --- declared config values -------------------------------------------------------------------------


class ValueKind(Enum):
    """What a config value a record reads must be (JSON null always means "absent": the default)."""

    BOOL = "true or false"
    COUNT = "an integer >= 0"
    POSITIVE = "a positive integer"
    STRING = "a string"
    OBJECT = "an object"
    STRINGS = "a list of strings"
    INTEGERS = "a list of integers"
    INDICES = "a list of layer indices (integers >= 0)"

    def accepts(self, value: Any) -> bool:
        if self is ValueKind.BOOL:
            return isinstance(value, bool)
        if self in (ValueKind.COUNT, ValueKind.POSITIVE):  # `true` is a Python int, not a count
            return type(value) is int and value >= (1 if self is ValueKind.POSITIVE else 0)
        if self is ValueKind.STRING:
            return isinstance(value, str)
        if self is ValueKind.OBJECT:
            return isinstance(value, Mapping)
        if not isinstance(value, list):
            return False
        if self is ValueKind.STRINGS:
            return all(isinstance(v, str) for v in value)
        if self is ValueKind.INTEGERS:
            return all(type(v) is int for v in value)
        return all(type(v) is int and v >= 0 for v in value)


@dataclass(frozen=True)
class ConfigKey:
    """One config key a formula, a refusal or the registry reads, with the kind its value must have."""

    key: str
    kind: ValueKind

    def problem(self, config: Config, where: str = "") -> str | None:
        """Why this key's value in `config` is unusable (None when absent, null or fine)."""
        value = config.get(self.key)
        if value is None or self.kind.accepts(value):
            return None
        text = json.dumps(value)
        shown = text if len(text) <= 40 else text[:37] + "..."
        return f"{where}{self.key} is {shown}, not {self.kind.value}"


@dataclass(frozen=True)
class Formula:
    """A per-layer formula ported from transformers: `derive(config, n)` gives the n per-layer values a
    config implies when it does not list them. `reads` declares every key it reads (checked before it
    ever runs, so a formula may divide by a period); `source` names the transformers code it follows."""

    derive: Callable[[Config, int], list[Any]]
    reads: tuple[ConfigKey, ...]
    source: str

    def __call__(self, config: Config, n: int) -> list[Any]:
        return self.derive(config, n)


class FieldKind(StrEnum):
    """How a per-layer config field stores its per-layer values."""

    LIST = "list"  # one value per layer (`layer_types`, `no_rope_layers`)
    INDEX_SET = "index_set"  # a list of layer indices that have the property (`mlp_only_layers`)
    THRESHOLD = "threshold"  # an int t: layers below t have the property (`max_window_layers`)
    PATTERN = "pattern"  # a string, one character per layer (`hybrid_override_pattern`)
    VIRTUAL = "virtual"  # not writable (index arithmetic only): a plan must keep every layer's value


# What the value of a per-layer field must be, by how it stores its values (LIST fields say their own).
_STORED_AS = {
    FieldKind.INDEX_SET: ValueKind.INDICES,
    FieldKind.THRESHOLD: ValueKind.COUNT,
    FieldKind.PATTERN: ValueKind.STRING,
}


@dataclass(frozen=True)
class LayerField:
    """One config field whose value depends on the layer index.

    `derive(config, num_layers)` gives the effective per-layer values when the field is absent or null
    (transformers' own default formula); with `derive_always` it gives them in every case (other keys,
    e.g. `decoder_sparse_step`, modify what the field says). For THRESHOLD fields a plan that scatters the
    "below" layers cannot be written as a threshold: `required` fields make that a refusal (exit 2);
    optional ones are left consistent where possible and reported otherwise. `periodic` fields follow an
    index pattern that engines may re-derive: a plan that breaks it is warned about. `label` turns a
    value into the layer-kind word `inspect` shows. `values` is what a LIST field's entries are.
    """

    key: str
    kind: FieldKind
    derive: Formula | None = None
    required: bool = False
    write_when_absent: bool = True
    relevant: Callable[[Config], bool] | None = None  # when false, a threshold mismatch is harmless
    derive_always: bool = False
    empty_is_absent: bool = False  # an empty list means "use the formula" (llama4 `no_rope_layers`)
    periodic: bool = False
    label: Callable[[Any], str] | None = None
    values: ValueKind = ValueKind.STRINGS  # LIST fields: the kind of the whole list

    def reads(self) -> tuple[ConfigKey, ...]:
        """The key itself (unless virtual) and every key its formula reads."""
        formula = self.derive.reads if self.derive else ()
        if self.kind is FieldKind.VIRTUAL:
            return formula
        return (ConfigKey(self.key, _STORED_AS.get(self.kind, self.values)), *formula)


@dataclass(frozen=True)
class Roles:
    """Checkpoint names of the non-block tensors trainers may also want trainable (`--also`)."""

    embeddings: tuple[str, ...] = ("model.embed_tokens.weight",)
    head: tuple[str, ...] = ("lm_head.weight",)
    final_norm: tuple[str, ...] = ("model.norm.weight", "model.norm.bias")


@dataclass(frozen=True)
class Family:
    """Everything block expansion needs to know about one architecture."""

    name: str
    model_types: tuple[str, ...]
    layer_prefix: str
    zero: tuple[str, ...]  # regexes over the block-relative name, anchored at both ends
    required: tuple[str, ...]  # each layer must have a tensor matching every one of these
    layer_fields: tuple[LayerField, ...] = ()
    count_key: str = "num_hidden_layers"
    count_list: str | None = None  # when count_key is absent, the length of this list is the count
    config_path: tuple[str, ...] = ()  # e.g. ("text_config",) for multimodal checkpoints
    memory_prefix: str | None = None  # in-memory parameter prefix when it differs from the disk prefix
    # In-memory names of checkpoint keys that transformers renames or fuses at load (MoE experts):
    # (regex, replacement) applied in order to the key after the prefix mapping; keys that end up with
    # the same name load into one parameter, a key renamed to "" is a buffer (freeze.memory_name).
    memory_renames: tuple[tuple[str, str], ...] = ()
    roles: Roles = field(default_factory=Roles)
    # Another on-disk layout of the same model (e.g. newer transformers' save names): key-prefix rewrites
    # from the names above, applied to layer_prefix and roles; `for_checkpoint` picks the one present.
    alt_roots: tuple[tuple[str, str], ...] = ()
    drop_keys: tuple[str, ...] = ()  # derivation fields made meaningless by explicit lists
    set_keys: tuple[tuple[str, Any], ...] = ()  # constants the explicit lists require
    extra_layers_key: str | None = None  # count of layer-indexed non-blocks at index >= n (MTP layers)
    refuse: str = ""  # why this family can never be expanded exactly (exit 3)
    refusal: Callable[[Config], str | None] | None = None  # a config-dependent refusal reason (exit 3)
    reads: tuple[ConfigKey, ...] = ()  # further (sub-)config keys read, e.g. by `refusal`
    notes: str = ""

    def for_checkpoint(self, tensor_names: Iterable[str]) -> Family:
        """This record as it applies to a checkpoint: the alternative layout when the blocks are there.

        Called once per checkpoint (Checkpoint.assemble), so every later user of `layer_prefix`,
        `split_name()` and `roles` sees the names this checkpoint actually has."""
        if not self.alt_roots:
            return self
        alt = self.alternative()
        names = list(tensor_names)
        if any(n.startswith(self.layer_prefix) for n in names):
            return self
        return alt if any(n.startswith(alt.layer_prefix) for n in names) else self

    def alternative(self) -> Family:
        """The record with `alt_roots` applied to every checkpoint name it holds."""

        def rename(name: str) -> str:
            return next((new + name[len(old) :] for old, new in self.alt_roots if name.startswith(old)), name)

        roles = Roles(
            embeddings=tuple(map(rename, self.roles.embeddings)),
            head=tuple(map(rename, self.roles.head)),
            final_norm=tuple(map(rename, self.roles.final_norm)),
        )
        return replace(self, layer_prefix=rename(self.layer_prefix), roles=roles, alt_roots=())

    def split_name(self, name: str) -> tuple[int, str] | None:
        """(layer index, block-relative name) of a block tensor; None outside the blocks; exit 3 when
        malformed (`split_layer_name`)."""
        return split_layer_name(name, self.layer_prefix)

    def layer_of(self, name: str) -> int | None:
        return layer_index(name, self.layer_prefix)

    def is_zeroed(self, relative_name: str) -> bool:
        # re.ASCII: `\d` in an expert index means 0-9, as in every other layer-indexed name.
        return any(re.fullmatch(p, relative_name, re.ASCII) for p in self.zero)

    def sub_config(self, config: Config) -> Config:
        """The (sub-)config that holds the layer count and per-layer fields (`{}` where there is none)."""
        for key in self.config_path:
            value = config.get(key)
            config = value if isinstance(value, Mapping) else {}
        return config
