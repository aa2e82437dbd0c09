"""Model families as data: the `Family` record type and the generic code that applies records to a plan.

A record (see `families.py`, which holds every record) says where a family's decoder blocks live in the
checkpoint, which tensors of a copied block must be zeroed so the copy is an exact identity (the last
linear of every residual branch, weight *and* bias, every routed and shared expert), which tensors every
block must have, and which config fields decide per-layer behaviour (with the formula transformers uses
when a config has no explicit list, ported so `expand` never imports transformers). The functions here
turn those records into per-layer values, kinds for `inspect`, per-layer signatures for
`verify-identity`, refusals and compatibility warnings; `rewrite.py` turns them into the expanded config.

Invariant: a new family is a new record (plus, at most, a small formula); no per-family branches here.
Must not: read files, import torch or transformers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from llamapro_cli.errors import UnsupportedError

Config = Mapping[str, Any]
COMPAT_DOC = "docs/compatibility.md"


class FieldKind(StrEnum):
    """How a per-layer config field stores its per-layer values."""

    LIST = "list"  # one value per layer (`layer_types`, `no_rope_layers`)
    INDEX_SET = "index_set"  # a list of layer indices that have the property (`mlp_only_layers`)
    THRESHOLD = "threshold"  # an int t: layers below t have the property (`max_window_layers`)
    PATTERN = "pattern"  # a string, one character per layer (`hybrid_override_pattern`)
    VIRTUAL = "virtual"  # not writable (index arithmetic only): a plan must keep every layer's value


@dataclass(frozen=True)
class LayerField:
    """One config field whose value depends on the layer index.

    `derive(config, num_layers)` gives the effective per-layer values when the field is absent or null
    (transformers' own default formula); with `derive_always` it gives them in every case (other keys,
    e.g. `decoder_sparse_step`, modify what the field says). For THRESHOLD fields a plan that scatters the
    "below" layers cannot be written as a threshold: `required` fields make that a refusal (exit 2);
    optional ones are left consistent where possible and reported otherwise. `periodic` fields follow an
    index pattern that engines may re-derive: a plan that breaks it is warned about. `label` turns a
    value into the layer-kind word `inspect` shows.
    """

    key: str
    kind: FieldKind
    derive: Callable[[Config, int], list[Any]] | None = None
    required: bool = False
    write_when_absent: bool = True
    relevant: Callable[[Config], bool] | None = None  # when false, a threshold mismatch is harmless
    derive_always: bool = False
    empty_is_absent: bool = False  # an empty list means "use the formula" (llama4 `no_rope_layers`)
    periodic: bool = False
    label: Callable[[Any], str] | None = None


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
    notes: str = ""

    def for_checkpoint(self, tensor_names: Iterable[str]) -> Family:
        """This record as it applies to a checkpoint: the alternative layout when the blocks are there.

        Called once per checkpoint (Checkpoint.assemble), so every later user of `layer_prefix`,
        `block_regex()` and `roles` sees the names this checkpoint actually has."""
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

    def block_regex(self) -> re.Pattern[str]:
        return re.compile(rf"^{re.escape(self.layer_prefix)}(\d+)\.(.+)$")

    def is_zeroed(self, relative_name: str) -> bool:
        return any(re.fullmatch(p, relative_name) for p in self.zero)

    def sub_config(self, config: Config) -> Config:
        """The (sub-)config that holds the layer count and per-layer fields."""
        for key in self.config_path:
            config = config.get(key) or {}
        return config


# Every record lives in families.py, which imports the types above; it is loaded on first use so either
# module can be imported first.
FAMILIES: tuple[Family, ...]


def __getattr__(name: str) -> Any:
    if name == "FAMILIES":
        return _families()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _families() -> tuple[Family, ...]:
    from llamapro_cli.architectures.families import FAMILIES as records

    return records


def _full_attention(config: Config, n: int) -> list[str]:
    return ["full_attention"] * n


# Generic per-layer fields any config may carry: remapped by source when present, never invented.
GENERIC_FIELDS: tuple[LayerField, ...] = (
    LayerField("layer_types", FieldKind.LIST, _full_attention, write_when_absent=False, label=str),
    LayerField("mlp_layer_types", FieldKind.LIST, None, write_when_absent=False),
)

# Quantization methods whose zero is not all-zero bytes (packed integers with zero-points).
REFUSED_QUANTIZATION = ("gptq", "awq", "bitsandbytes", "bnb", "aqlm", "eetq", "hqq", "quanto", "exl2")
ALLOWED_QUANTIZATION = ("fp8", "mxfp4", "compressed-tensors-fp8", "fbgemm_fp8")
# quantization_config keys that list module names (possibly layer-indexed, possibly "re:" regexes).
QUANT_NAME_KEYS = ("ignore", "modules_to_not_convert", "ignored_layers")


def supported_model_types() -> list[str]:
    return sorted(t for f in _families() if not f.refuse for t in f.model_types)


def family_for(config: Config) -> Family:
    """The record for a config's `model_type`; exit 3 with a hint for anything else or refused."""
    model_type = config.get("model_type")
    for fam in _families():
        if model_type in fam.model_types:
            _check_refusal(fam, config, str(model_type))
            _check_quantization(config, str(model_type))
            return fam
    arch = (config.get("architectures") or ["?"])[0]
    raise UnsupportedError(
        f"unsupported architecture: model_type {model_type!r} ({arch})",
        hint="supported model types: " + ", ".join(supported_model_types()),
    )


def _check_refusal(fam: Family, config: Config, model_type: str) -> None:
    reason = fam.refuse or (fam.refusal(fam.sub_config(config)) if fam.refusal else None)
    if reason:
        raise UnsupportedError(
            f"refused {model_type}: {reason}",
            hint="an inserted copy cannot be an exact identity here; see docs/architectures.md",
        )


def _check_quantization(config: Config, model_type: str) -> None:
    qc = config.get("quantization_config")
    if not qc:
        return
    method = str(qc.get("quant_method", "unknown")).lower() if isinstance(qc, Mapping) else "unknown"
    if method in ALLOWED_QUANTIZATION:
        return
    raise UnsupportedError(
        f"refused quantization {method!r} on {model_type}: zeroing packed integer weights with "
        "zero-points does not give zero",
        hint="expand the unquantized checkpoint, then quantize the result",
    )


def num_layers(family: Family, config: Config) -> int | None:
    sub = family.sub_config(config)
    value = sub.get(family.count_key)
    if value is None and family.count_list and isinstance(sub.get(family.count_list), list):
        return len(sub[family.count_list])
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def extra_layers(family: Family, config: Config) -> int:
    """How many layer-indexed non-block modules (DeepSeek-V3 MTP) sit at indices n, n+1, ..."""
    if family.extra_layers_key is None:
        return 0
    value = family.sub_config(config).get(family.extra_layers_key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def renumber_extra(family: Family, name: str, n_in: int, n_out: int) -> str:
    """A non-block tensor's output name: extra layers at n_in + m move to n_out + m (MTP layers)."""
    m = family.block_regex().match(name)
    if not m or int(m.group(1)) < n_in:
        return name
    return f"{family.layer_prefix}{int(m.group(1)) - n_in + n_out}.{m.group(2)}"


# --- per-layer values -----------------------------------------------------------------------------------


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


def _fields(family: Family) -> tuple[LayerField, ...]:
    """Generic fields first, then the family's (a family record overrides a generic field by key)."""
    own = {f.key for f in family.layer_fields}
    return (*(f for f in GENERIC_FIELDS if f.key not in own), *family.layer_fields)


def _active(fld: LayerField, sub: Config) -> bool:
    """Whether a field describes this config (present, or a family formula that always applies)."""
    return fld.kind is FieldKind.VIRTUAL or fld.key in sub or fld.write_when_absent


def _columns(family: Family, config: Config) -> list[tuple[LayerField, list[Any]]] | None:
    sub = family.sub_config(config)
    n = num_layers(family, config)
    if n is None:
        return None
    out = []
    for fld in _fields(family):
        values = effective_values(fld, sub, n) if _active(fld, sub) else None
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
    for fld in _fields(family):
        if n is None or not fld.periodic or fld.derive is None or sub.get(fld.key) in (None, []):
            continue
        values = effective_values(fld, sub, n)
        formula = fld.derive(_without(sub, fld.key), n)
        if values is not None and values != formula:
            out.append(_pattern_message(family, fld, [j for j in range(n) if values[j] != formula[j]]))
    return out


def _pattern_message(family: Family, fld: LayerField, layers: list[int]) -> str:
    return (
        f"{fld.key}: layers {_short(layers)} break {family.name}'s periodic layer pattern; exact in "
        "engines that read the explicit list (transformers), but engines or converters that derive "
        f"per-layer behaviour from the index would run a different model (see {COMPAT_DOC})"
    )


def _short(values: Sequence[int]) -> str:
    return ", ".join(map(str, values[:8])) + (", …" if len(values) > 8 else "")


def _without(sub: Config, key: str) -> dict[str, Any]:
    return {k: v for k, v in sub.items() if k != key}


# --- generated documentation --------------------------------------------------------------------------


def support_matrix_markdown() -> str:
    """docs/architectures.md, generated from the registry (a test fails when the committed file is stale)."""
    lines = [
        "# Supported architectures",
        "",
        "<!-- generated by `python scripts/gen_docs.py`; do not edit -->",
        "",
        "Each family below is a record in `llamapro_cli/families.py`. *Zeroed* lists the branch-final",
        "tensors (regexes over the block-relative name) that every inserted copy gets as zeros: weights and",
        "biases, every routed and shared expert. *Per-layer fields* are the config keys `expand` rewrites so",
        "each original layer keeps its behaviour and each copy behaves like its source; when a config lacks",
        "them they are derived with transformers' own formula and written explicitly. Every supported family",
        "is checked in `tests/test_families.py` against transformers (bit-identical logits, full forward and",
        "cached decoding). See [compatibility](compatibility.md) for engines that derive per-layer behaviour",
        "from the index.",
        "",
        "| family | model_type | blocks | zeroed in each copy | per-layer fields | status |",
        "|---|---|---|---|---|---|",
    ]
    for fam in _families():
        lines.append("| " + " | ".join(_matrix_row(fam)) + " |")
    lines += [
        "",
        "Refused families exit with code 3 before anything is written. Plans a config cannot express",
        "exit with code 2: a DeepSeek plan that puts a dense layer after a MoE layer",
        "(`first_k_dense_replace` must stay a threshold), and jamba insertions that change any layer's",
        "`i % period` (use `--every P --copies P` to copy whole periods). Quantized checkpoints: FP8",
        "block-scaled (`weight_scale_inv`) and MXFP4 (`*_blocks` zeroed, `*_scales` copied) are",
        "expanded, and layer-indexed names in `quantization_config` (`ignore`,",
        "`modules_to_not_convert`) are remapped; GPTQ, AWQ and bitsandbytes are refused (a packed zero",
        "with zero-points is not zero).",
        "",
        "DeepSeek-V3 multi-token-prediction layers (`model.layers.{N}`, N = `num_hidden_layers`) are not",
        "blocks: they move to the new N and are exempt from the layer-count checks; transformers ignores",
        "them at load either way (it matches their original hard-coded index).",
        "",
    ]
    return "\n".join(lines)


def _matrix_row(fam: Family) -> list[str]:
    def code(items: Sequence[str]) -> str:
        return "<br>".join(f"`{i.replace('|', '&#124;')}`" for i in items) or "–"

    fields = [f.key + ("" if f.kind is FieldKind.LIST else f" ({f.kind.value})") for f in fam.layer_fields]
    where = ".".join((*fam.config_path, "")) if fam.config_path else ""
    layouts = (fam, fam.alternative()) if fam.alt_roots else (fam,)
    status = f"refused: {fam.refuse}" if fam.refuse else "supported" + (f"; {fam.notes}" if fam.notes else "")
    return [
        fam.name,
        ", ".join(f"`{t}`" for t in fam.model_types),
        "<br>".join(f"`{f.layer_prefix}{{i}}.`" for f in layouts),
        code(fam.zero),
        code([where + f for f in fields]),
        status,
    ]
