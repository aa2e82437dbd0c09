"""Model families as data: one frozen `Family` record per supported architecture.

A record says where a family's decoder blocks live in the checkpoint, which tensors of a copied block
must be zeroed so the copy is an exact identity (the last linear of every residual branch, weight *and*
bias), which tensors every block must have, and which config fields decide per-layer behaviour (with the
formula transformers uses when a config has no explicit list, ported here so `expand` never imports
transformers). The generic code below turns those records into a rewritten config for a plan.

Invariant: a new family is a new record (plus, at most, a new `LayerField` formula); no per-family
branches in the code that uses them. Must not: read files, import torch or transformers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .errors import UnsupportedError, UsageError
from .plan import ExpansionPlan

Config = Mapping[str, Any]


class FieldKind(StrEnum):
    """How a per-layer config field stores its per-layer values."""

    LIST = "list"  # one value per layer (`layer_types`, `no_rope_layers`)
    INDEX_SET = "index_set"  # a list of layer indices that have the property (`mlp_only_layers`)
    THRESHOLD = "threshold"  # an int t: layers below t have the property (`max_window_layers`)


@dataclass(frozen=True)
class LayerField:
    """One config field whose value depends on the layer index.

    `derive(config, num_layers)` gives the effective per-layer values when the field is absent or null
    (transformers' own default formula). For THRESHOLD fields a plan that scatters the "below" layers
    cannot be written as a threshold: `required` fields make that a refusal; optional ones are left
    consistent where possible and reported otherwise (the explicit lists still carry the truth).
    """

    key: str
    kind: FieldKind
    derive: Callable[[Config, int], list[Any]] | None = None
    required: bool = False
    write_when_absent: bool = True
    relevant: Callable[[Config], bool] | None = None  # when false, a threshold mismatch is harmless


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
    config_path: tuple[str, ...] = ()  # e.g. ("text_config",) for multimodal checkpoints
    memory_prefix: str | None = None  # in-memory parameter prefix when it differs from the disk prefix
    roles: Roles = field(default_factory=Roles)
    drop_keys: tuple[str, ...] = ()  # derivation fields made meaningless by explicit lists
    set_keys: tuple[tuple[str, Any], ...] = ()  # constants the explicit lists require
    notes: str = ""

    def block_regex(self) -> re.Pattern[str]:
        return re.compile(rf"^{re.escape(self.layer_prefix)}(\d+)\.(.+)$")

    def is_zeroed(self, relative_name: str) -> bool:
        return any(re.fullmatch(p, relative_name) for p in self.zero)

    def sub_config(self, config: Config) -> Config:
        """The (sub-)config that holds the layer count and per-layer fields."""
        for key in self.config_path:
            config = config.get(key) or {}
        return config


# --- per-layer formulas, ported from transformers' configuration_*.py --------------------------------


def _qwen2_layer_types(config: Config, n: int) -> list[str]:
    # configuration_qwen2.py: sliding_window is nulled unless use_sliding_window; sliding layers are
    # the upper ones, i >= max_window_layers (default 28; sliding_window default 4096).
    window = config.get("sliding_window", 4096) if config.get("use_sliding_window", False) else None
    threshold = config.get("max_window_layers", 28)
    return [
        "sliding_attention" if window is not None and i >= threshold else "full_attention" for i in range(n)
    ]


def _full_attention(config: Config, n: int) -> list[str]:
    return ["full_attention"] * n


def _threshold_default(default: int) -> Callable[[Config, int], list[Any]]:
    def derive(config: Config, n: int) -> list[Any]:
        return [True] * min(default, n) + [False] * max(0, n - default)

    return derive


QWEN_LAYER_TYPES = LayerField("layer_types", FieldKind.LIST, _qwen2_layer_types)
QWEN_MAX_WINDOW = LayerField(
    "max_window_layers",
    FieldKind.THRESHOLD,
    _threshold_default(28),
    relevant=lambda config: bool(config.get("use_sliding_window", False)),
)

_ATTN_OUT = r"self_attn\.o_proj\.(weight|bias)"
_MLP_OUT = r"mlp\.down_proj\.(weight|bias)"
_LLAMA_REQUIRED = (r"self_attn\.o_proj\.weight", r"mlp\.down_proj\.weight")

FAMILIES: tuple[Family, ...] = (
    Family(
        name="llama",
        model_types=("llama", "internlm3"),
        layer_prefix="model.layers.",
        zero=(_ATTN_OUT, _MLP_OUT),
        required=_LLAMA_REQUIRED,
        notes="o_proj/down_proj biases exist with attention_bias/mlp_bias (internlm3: qkv_bias/bias)",
    ),
    Family(
        name="mistral",
        model_types=("mistral",),
        layer_prefix="model.layers.",
        zero=(_ATTN_OUT, _MLP_OUT),
        required=_LLAMA_REQUIRED,
        notes="one global sliding_window: nothing per layer",
    ),
    Family(
        name="qwen2",
        model_types=("qwen2",),
        layer_prefix="model.layers.",
        zero=(_ATTN_OUT, _MLP_OUT),
        required=_LLAMA_REQUIRED,
        layer_fields=(QWEN_LAYER_TYPES, QWEN_MAX_WINDOW),
        notes="layer_types derived from use_sliding_window/max_window_layers when absent",
    ),
    Family(
        name="qwen3",
        model_types=("qwen3",),
        layer_prefix="model.layers.",
        zero=(_ATTN_OUT, _MLP_OUT),
        required=_LLAMA_REQUIRED,
        layer_fields=(QWEN_LAYER_TYPES, QWEN_MAX_WINDOW),
        notes="as qwen2, plus per-head q/k norms",
    ),
)

# Generic per-layer fields any config may carry: remapped by source when present, never invented.
GENERIC_FIELDS: tuple[LayerField, ...] = (
    LayerField("layer_types", FieldKind.LIST, _full_attention, write_when_absent=False),
    LayerField("mlp_layer_types", FieldKind.LIST, None, write_when_absent=False),
)

# Quantization methods whose zero is not all-zero bytes (packed integers with zero-points).
REFUSED_QUANTIZATION = ("gptq", "awq", "bitsandbytes", "bnb", "aqlm", "eetq", "hqq", "quanto", "exl2")
ALLOWED_QUANTIZATION = ("fp8", "mxfp4", "compressed-tensors-fp8", "fbgemm_fp8")


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_for(config: Config) -> Family:
    """The record for a config's `model_type`; exit 3 with a hint for anything else."""
    model_type = config.get("model_type")
    for fam in FAMILIES:
        if model_type in fam.model_types:
            _check_quantization(config, str(model_type))
            return fam
    arch = (config.get("architectures") or ["?"])[0]
    raise UnsupportedError(
        f"unsupported architecture: model_type {model_type!r} ({arch})",
        hint="supported model types: " + ", ".join(supported_model_types()),
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
    value = family.sub_config(config).get(family.count_key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --- config rewrite -----------------------------------------------------------------------------------


def effective_values(fld: LayerField, config: Config, n: int) -> list[Any] | None:
    """Per-layer values of one field for an n-layer config (explicit, else derived, else None)."""
    raw = config.get(fld.key)
    if raw is None:
        return fld.derive(config, n) if fld.derive else None
    if fld.kind is FieldKind.LIST:
        if not isinstance(raw, list) or len(raw) != n:
            raise UnsupportedError(f"config.json: {fld.key} has {_length(raw)} entries for {n} layers")
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


def layer_kinds(family: Family, config: Config) -> list[str] | None:
    """A short per-layer kind label (attention type, ...) for `inspect`, when the family has kinds."""
    sub = family.sub_config(config)
    n = num_layers(family, config)
    if n is None:
        return None
    for fld in (*family.layer_fields, *GENERIC_FIELDS):
        if fld.key == "layer_types":
            values = effective_values(fld, sub, n)
            if values is not None and (fld.key in sub or fld.write_when_absent):
                return [str(v) for v in values]
    return None


def rewrite_config(family: Family, config: Config, plan: ExpansionPlan) -> tuple[dict[str, Any], list[str]]:
    """The expanded config and warnings: count updated, every per-layer field remapped by source.

    Only the keys the surgery requires change; every other key and value is kept in order.
    """
    new = _deep_copy(config)
    sub = _sub_dict(family, new)
    old = family.sub_config(config)  # read every field from the untouched original
    n = plan.num_layers_in
    sources = [layer.source for layer in plan.layers]
    warnings: list[str] = []
    _refuse_unknown_lists(family, old, n)
    fields = {f.key: f for f in (*GENERIC_FIELDS, *family.layer_fields)}  # family records win
    for fld in fields.values():
        if old.get(fld.key) is None and not fld.write_when_absent:
            continue
        values = effective_values(fld, old, n)
        if values is None:
            continue
        warning = _write_field(fld, sub, [values[s] for s in sources])
        if warning and (fld.relevant is None or fld.relevant(old)):
            warnings.append(warning)
    sub[family.count_key] = plan.num_layers_out
    for key in family.drop_keys:
        sub.pop(key, None)
    for key, value in family.set_keys:
        sub[key] = value
    return new, warnings


def _write_field(fld: LayerField, sub: dict[str, Any], values: list[Any]) -> str | None:
    if fld.kind is FieldKind.LIST:
        sub[fld.key] = values
        return None
    if fld.kind is FieldKind.INDEX_SET:
        sub[fld.key] = [j for j, member in enumerate(values) if member]
        return None
    count = sum(1 for v in values if v)
    if all(values[:count]) and not any(values[count:]):
        sub[fld.key] = count
        return None
    if fld.required:
        raise UsageError(
            f"this plan cannot be expressed: {fld.key} needs the layers below a threshold to stay "
            "a prefix, and the plan puts a copy of one of them after a later layer",
            hint="place copies right after their source (--every or --after)",
        )
    sub[fld.key] = count
    return (
        f"{fld.key} cannot describe this layout as a threshold; the explicit per-layer lists in "
        "config.json carry it (engines that ignore them would run a different model)"
    )


def _refuse_unknown_lists(family: Family, sub: Config, n: int) -> None:
    known = {f.key for f in (*GENERIC_FIELDS, *family.layer_fields)}
    for key, value in sub.items():
        if n > 1 and isinstance(value, list) and len(value) == n and key not in known | _NOT_PER_LAYER:
            raise UnsupportedError(
                f"config.json: {key} has one entry per layer and llamapro does not know how to remap it",
                hint="please report this config; it may change per-layer behaviour",
            )


_NOT_PER_LAYER = frozenset({"architectures", "bad_words_ids", "suppress_tokens", "eos_token_id"})


def _sub_dict(family: Family, config: dict[str, Any]) -> dict[str, Any]:
    sub = config
    for key in family.config_path:
        sub = sub[key]
    return sub


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def layer_signature(family: Family, config: Config) -> list[tuple[Any, ...]] | None:
    """Per-layer behaviour tuple (one value per known field) used to compare a copy with its source."""
    sub = family.sub_config(config)
    n = num_layers(family, config)
    if n is None:
        return None
    columns: list[Sequence[Any]] = []
    for fld in (*GENERIC_FIELDS, *family.layer_fields):
        values = effective_values(fld, sub, n)
        if values is not None and (fld.key in sub or fld.write_when_absent):
            columns.append(values)
    return [tuple(col[i] for col in columns) for i in range(n)]
