"""The per-layer formulas ported from transformers, so `expand` and `inspect` never import it.

Each `Formula` gives the per-layer values a config implies when it does not list them, declares every
config key it reads (with the kind and range its value must have: the registry checks them when a
family is resolved, so a formula may divide by a period) and names the transformers source it follows
(transformers 5.24/5.25, `src/transformers/models/<family>/`). Also here: the config-dependent refusals
(rules read from the same sources) and the label functions that turn a per-layer value into the word
`inspect` shows. `tests/test_families.py` asserts every formula against transformers' own classes.

Invariant: pure functions of a config dict and a layer count; a key read here is declared in `reads`.
Must not: hold records, branch on family names, import torch or transformers.
"""

from __future__ import annotations

from typing import Any

from llamapro_cli.architectures.record import Config, ConfigKey, Formula, ValueKind

BOOL, COUNT, POSITIVE = ValueKind.BOOL, ValueKind.COUNT, ValueKind.POSITIVE


def _int(config: Config, key: str, default: int) -> int:
    # Declared keys are checked before any formula runs: a non-integer here is null or absent.
    value = config.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _first(config: Config, keys: tuple[str, ...], default: int) -> int:
    """The first of a key and its aliases (transformers' `attribute_map`) that is set: `keys` in the
    order transformers lets one win over the other when a config carries both."""
    return next((_int(config, k, default) for k in keys if config.get(k) is not None), default)


def _key(key: str, kind: ValueKind) -> ConfigKey:
    return ConfigKey(key, kind)


# --- attention kinds ------------------------------------------------------------------------------------


def _full_attention(config: Config, n: int) -> list[str]:
    return ["full_attention"] * n


FULL_ATTENTION = Formula(_full_attention, (), "configuration_utils.py: a config without layer_types")


def _qwen2_layer_types(config: Config, n: int) -> list[str]:
    # qwen2/qwen3: sliding_window is nulled unless use_sliding_window; the *upper* layers slide.
    window = config.get("sliding_window", 4096) if config.get("use_sliding_window", False) else None
    threshold = _int(config, "max_window_layers", 28)
    return [
        "sliding_attention" if window is not None and i >= threshold else "full_attention" for i in range(n)
    ]


_SLIDING_KEYS = (
    _key("use_sliding_window", BOOL),
    _key("sliding_window", COUNT),
    _key("max_window_layers", COUNT),
)
QWEN2_LAYER_TYPES = Formula(
    _qwen2_layer_types,
    _SLIDING_KEYS,
    "qwen2/configuration_qwen2.py, qwen3/configuration_qwen3.py: layer_types",
)


def _qwen2_moe_layer_types(config: Config, n: int) -> list[str]:
    # qwen2_moe: the *even* layers below max_window_layers slide, so a copy flips everything after it.
    on, threshold = bool(config.get("use_sliding_window", False)), _int(config, "max_window_layers", 28)
    return [
        "sliding_attention" if on and (i + 1) % 2 and i < threshold else "full_attention" for i in range(n)
    ]


QWEN2_MOE_LAYER_TYPES = Formula(
    _qwen2_moe_layer_types, _SLIDING_KEYS, "qwen2_moe/configuration_qwen2_moe.py: layer_types"
)


def every_kth_full(key: str | None, default: int, other: str, source: str) -> Formula:
    """`other` unless (i+1) % k == 0, then full attention (gemma2/3, cohere2, olmo3, gpt-oss, qwen3_next).

    `key` names the period's config key; None: a fixed period. (Saved configs may also carry a private
    `_key`: transformers ignores it when it derives layer_types, so do we.)"""

    def derive(config: Config, n: int) -> list[str]:
        k = _int(config, key, default) if key else default
        return [other if (i + 1) % k else "full_attention" for i in range(n)]

    return Formula(derive, (_key(key, POSITIVE),) if key else (), source)


def threshold_default(key: str, default: int, source: str) -> Formula:
    """Layers below the threshold `key` (default `default`) have the property."""

    def derive(config: Config, n: int) -> list[Any]:
        t = _int(config, key, default)
        return [i < t for i in range(n)]

    return Formula(derive, (_key(key, COUNT),), source)


# --- MoE layouts ----------------------------------------------------------------------------------------


def qwen_moe_dense(experts_keys: tuple[str, ...], source: str) -> Formula:
    """Dense flags: MoE iff i not in mlp_only_layers, experts exist and (i+1) % decoder_sparse_step == 0.
    Written back as step 1 + explicit mlp_only_layers. `experts_keys`: the expert count's key, then its
    aliases (qwen3_moe saves `num_local_experts` and reads `num_experts` as an alias of it)."""

    def derive(config: Config, n: int) -> list[bool]:
        only = set(config.get("mlp_only_layers") or ())
        experts = _first(config, experts_keys, 1)  # every default is positive: only <= 0 matters
        step = _int(config, "decoder_sparse_step", 1)
        return [i in only or experts <= 0 or (i + 1) % step != 0 for i in range(n)]

    reads = (
        _key("mlp_only_layers", ValueKind.INDICES),
        *(_key(k, COUNT) for k in experts_keys),
        _key("decoder_sparse_step", POSITIVE),
    )
    return Formula(derive, reads, f"{source}: DecoderLayer.__init__ picks the sparse block")


def _llama4_no_rope(config: Config, n: int) -> list[int]:
    # 1 = this layer applies RoPE; every no_rope_layer_interval-th layer is NoPE.
    k = _int(config, "no_rope_layer_interval", 4)
    return [int((i + 1) % k != 0) for i in range(n)]


LLAMA4_NO_ROPE = Formula(
    _llama4_no_rope,
    (_key("no_rope_layer_interval", POSITIVE),),
    "llama4/configuration_llama4.py: default_no_rope_layers",
)


def _llama4_moe(config: Config, n: int) -> list[bool]:
    step = _int(config, "interleave_moe_layer_step", 1)
    return [i in range(step - 1, n, step) for i in range(n)]


LLAMA4_MOE = Formula(
    _llama4_moe,
    (_key("interleave_moe_layer_step", POSITIVE),),
    "llama4/configuration_llama4.py: moe_layers from interleave_moe_layer_step",
)


def _llama4_layer_types(config: Config, n: int) -> list[str]:
    raw = config.get("no_rope_layers")
    rope = raw if isinstance(raw, list) and len(raw) == n else _llama4_no_rope(config, n)
    chunked = config.get("attention_chunk_size", 8192) is not None  # absent: the class default 8192
    return ["chunked_attention" if r and chunked else "full_attention" for r in rope]


LLAMA4_LAYER_TYPES = Formula(
    _llama4_layer_types,
    (
        _key("no_rope_layers", ValueKind.INTEGERS),
        _key("no_rope_layer_interval", POSITIVE),
        _key("attention_chunk_size", POSITIVE),
    ),
    "llama4/configuration_llama4.py: layer_types (chunked attention on the RoPE layers)",
)


# --- hybrid families ------------------------------------------------------------------------------------


def _lfm2_types(config: Config, n: int) -> list[str]:
    # Absent full_attn_idxs: every layer is attention.
    raw = config.get("full_attn_idxs")
    members = set(raw) if isinstance(raw, list) else set(range(n))
    return ["full_attention" if i in members else "conv" for i in range(n)]


_LFM2_SOURCE = "lfm2/configuration_lfm2.py: layer_types from full_attn_idxs"
LFM2_LAYER_TYPES = Formula(_lfm2_types, (_key("full_attn_idxs", ValueKind.INDICES),), _LFM2_SOURCE)


def _lfm2_full(config: Config, n: int) -> list[bool]:
    raw = config.get("layer_types")
    types = raw if isinstance(raw, list) and len(raw) == n else _lfm2_types(config, n)
    return [t == "full_attention" for t in types]


LFM2_FULL_ATTENTION = Formula(
    _lfm2_full,
    (_key("layer_types", ValueKind.STRINGS), _key("full_attn_idxs", ValueKind.INDICES)),
    _LFM2_SOURCE,
)

_NEMOTRON_CHARS = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}
_NEMOTRON_NAMES = {"mamba": "M", "attention": "*", **{v: k for k, v in _NEMOTRON_CHARS.items()}}
_NEMOTRON_SOURCE = "nemotron_h/configuration_nemotron_h.py: hybrid_override_pattern <-> layers_block_type"


def _nemotron_types(config: Config, n: int) -> list[str]:
    pattern = config.get("hybrid_override_pattern")
    if isinstance(pattern, str) and len(pattern) == n:
        return [_NEMOTRON_CHARS.get(c, c) for c in pattern]
    return ["linear_attention"] * n


NEMOTRON_TYPES = Formula(
    _nemotron_types, (_key("hybrid_override_pattern", ValueKind.STRING),), _NEMOTRON_SOURCE
)


def _nemotron_pattern(config: Config, n: int) -> list[str]:
    raw = config.get("layers_block_type")
    types = raw if isinstance(raw, list) and len(raw) == n else _nemotron_types(config, n)
    return [_NEMOTRON_NAMES.get(t, "?") for t in types]


NEMOTRON_PATTERN = Formula(
    _nemotron_pattern,
    (_key("layers_block_type", ValueKind.STRINGS), _key("hybrid_override_pattern", ValueKind.STRING)),
    _NEMOTRON_SOURCE,
)


def _jamba_kinds(config: Config, n: int) -> list[str]:
    # Attention iff i % attn_layer_period == attn_layer_offset, MoE iff i % expert_layer_period ==
    # expert_layer_offset (with more than one expert); neither is writable as a list.
    ap, ao = _int(config, "attn_layer_period", 8), _int(config, "attn_layer_offset", 4)
    ep, eo = _int(config, "expert_layer_period", 2), _int(config, "expert_layer_offset", 1)
    experts = _first(config, ("num_local_experts", "num_experts"), 16) > 1  # the alias wins in 5.25
    return [
        ("attention" if i % ap == ao else "mamba") + (" moe" if experts and i % ep == eo else " dense")
        for i in range(n)
    ]


JAMBA_KINDS = Formula(
    _jamba_kinds,
    (
        _key("attn_layer_period", POSITIVE),
        _key("attn_layer_offset", COUNT),
        _key("expert_layer_period", POSITIVE),
        _key("expert_layer_offset", COUNT),
        _key("num_local_experts", COUNT),
        _key("num_experts", COUNT),
    ),
    "jamba/configuration_jamba.py: layers_block_type, layers_num_experts",
)


def _constant(value: Any) -> Any:
    def derive(config: Config, n: int) -> list[Any]:
        return [value] * n

    return derive


FALCON_H1_MIXER = Formula(
    _constant("hybrid"), (), "falcon_h1/modeling_falcon_h1.py: every layer runs mamba and attention"
)
BAMBA_ATTENTION = Formula(
    _constant(False), (), "bamba/configuration_bamba.py: no attn_layer_indices, every layer is mamba"
)
GRANITE_HYBRID_TYPES = Formula(
    _constant("linear_attention"),
    (),
    "granitemoehybrid/configuration_granitemoehybrid.py: layer_types default",
)


# --- config-dependent refusals --------------------------------------------------------------------------


def deepseek_refusal(config: Config) -> str | None:
    freq = config.get("moe_layer_freq", 1)
    if freq not in (None, 1):
        return f"moe_layer_freq {freq} (the native classes ignore it; remote code interleaves MoE layers)"
    return None


DEEPSEEK_READS = (_key("moe_layer_freq", POSITIVE),)


def gpt2_refusal(config: Config) -> str | None:
    # gpt2/modeling_gpt2.py: attn_weights / float(self.layer_idx + 1)
    if config.get("scale_attn_by_inverse_layer_idx"):
        return (
            "scale_attn_by_inverse_layer_idx divides attention scores by layer_idx + 1, so every layer "
            "after an inserted copy would change"
        )
    return None


GPT2_READS = (_key("scale_attn_by_inverse_layer_idx", BOOL),)


# --- labels: a per-layer value as the layer-kind word `inspect` shows ----------------------------------


def kind_word(value: Any) -> str:
    return str(value)  # layer_types values are already kind words


def dense_moe(dense: Any) -> str:
    return "dense" if dense else "moe"


def moe_dense(moe: Any) -> str:
    return "moe" if moe else "dense"


def rope(value: Any) -> str:
    return "rope" if value else "nope"


def attention_mamba(attention: Any) -> str:
    return "attention" if attention else "mamba"
