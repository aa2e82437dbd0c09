"""Every supported (or explicitly refused) model family, as data: one `Family` record each.

Facts come from `reference/architectures.md` (measured on transformers 5.24) and are re-checked by
`tests/test_families.py`, which expands a tiny model of every family and compares logits bit for bit.
A record names the block prefix on disk, the branch-final tensors a copy must zero (weights *and*
biases, every routed and shared expert, legacy per-expert and fused 3-D forms, MXFP4 `*_blocks`), the
tensors every layer must have, and the per-layer config fields with transformers' default formula.

Invariant: records and small formula functions only; the generic mechanism is in `architectures.py`.
Must not: branch on family names, import torch or transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llamapro_cli.architectures.registry import Config, Family, FieldKind, LayerField, Roles

# --- formulas, ported from transformers 5.24 configuration_*.py / modeling_*.py ----------------------


def _int(config: Config, key: str, default: int) -> int:
    value = config.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _qwen2_layer_types(config: Config, n: int) -> list[str]:
    # qwen2/qwen3: sliding_window is nulled unless use_sliding_window; the *upper* layers slide.
    window = config.get("sliding_window", 4096) if config.get("use_sliding_window", False) else None
    threshold = _int(config, "max_window_layers", 28)
    return [
        "sliding_attention" if window is not None and i >= threshold else "full_attention" for i in range(n)
    ]


def _qwen2_moe_layer_types(config: Config, n: int) -> list[str]:
    # qwen2_moe: the *even* layers below max_window_layers slide, so a copy flips everything after it.
    on, threshold = bool(config.get("use_sliding_window", False)), _int(config, "max_window_layers", 28)
    return [
        "sliding_attention" if on and (i + 1) % 2 and i < threshold else "full_attention" for i in range(n)
    ]


def _every_kth_full(key: str | None, default: int, other: str) -> Callable[[Config, int], list[str]]:
    """`other` unless (i+1) % k == 0, then full attention (gemma2/3, cohere2, olmo3, gpt-oss, qwen3_next)."""

    def derive(config: Config, n: int) -> list[str]:
        k = _int(config, key, _int(config, f"_{key}", default)) if key else default
        return [other if (i + 1) % k else "full_attention" for i in range(n)]

    return derive


def _threshold_default(key: str, default: int) -> Callable[[Config, int], list[Any]]:
    def derive(config: Config, n: int) -> list[Any]:
        t = _int(config, key, default)
        return [i < t for i in range(n)]

    return derive


def _qwen_moe_dense(config: Config, n: int) -> list[bool]:
    # modeling_qwen2_moe/qwen3_moe/qwen3_next: MoE iff i not in mlp_only_layers, experts exist and
    # (i+1) % decoder_sparse_step == 0. Written back as step 1 + explicit mlp_only_layers.
    only = set(config.get("mlp_only_layers") or ())
    experts, step = _int(config, "num_experts", 60), max(1, _int(config, "decoder_sparse_step", 1))
    return [i in only or experts <= 0 or (i + 1) % step != 0 for i in range(n)]


def _llama4_no_rope(config: Config, n: int) -> list[int]:
    # 1 = this layer applies RoPE; every no_rope_layer_interval-th layer is NoPE.
    k = _int(config, "no_rope_layer_interval", 4)
    return [int((i + 1) % k != 0) for i in range(n)]


def _llama4_moe(config: Config, n: int) -> list[bool]:
    step = max(1, _int(config, "interleave_moe_layer_step", 1))
    return [i in range(step - 1, n, step) for i in range(n)]


def _llama4_layer_types(config: Config, n: int) -> list[str]:
    raw = config.get("no_rope_layers")
    rope = raw if isinstance(raw, list) and len(raw) == n else _llama4_no_rope(config, n)
    chunked = config.get("attention_chunk_size") is not None
    return ["chunked_attention" if r and chunked else "full_attention" for r in rope]


def _index_set(key: str, default: str, member: str) -> Callable[[Config, int], list[str]]:
    """Per-layer kind from a list of indices (lfm2 `full_attn_idxs`): absent = every layer `member`."""

    def derive(config: Config, n: int) -> list[str]:
        raw = config.get(key)
        members = set(raw) if isinstance(raw, list) else set(range(n))
        return [member if i in members else default for i in range(n)]

    return derive


def _lfm2_full(config: Config, n: int) -> list[bool]:
    raw = config.get("layer_types")
    types = (
        raw
        if isinstance(raw, list) and len(raw) == n
        else _index_set("full_attn_idxs", "conv", "")(config, n)
    )
    return [t == "full_attention" or t == "" for t in types]


_NEMOTRON_CHARS = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}
_NEMOTRON_NAMES = {"mamba": "M", "attention": "*", **{v: k for k, v in _NEMOTRON_CHARS.items()}}


def _nemotron_types(config: Config, n: int) -> list[str]:
    pattern = config.get("hybrid_override_pattern")
    if isinstance(pattern, str) and len(pattern) == n:
        return [_NEMOTRON_CHARS.get(c, c) for c in pattern]
    return ["linear_attention"] * n


def _nemotron_pattern(config: Config, n: int) -> list[str]:
    raw = config.get("layers_block_type")
    types = raw if isinstance(raw, list) and len(raw) == n else _nemotron_types(config, n)
    return [_NEMOTRON_NAMES.get(t, "?") for t in types]


def _jamba_kinds(config: Config, n: int) -> list[str]:
    # modeling_jamba: attention iff i % attn_layer_period == attn_layer_offset, MoE iff
    # i % expert_layer_period == expert_layer_offset; neither is writable as a list.
    ap, ao = max(1, _int(config, "attn_layer_period", 8)), _int(config, "attn_layer_offset", 4)
    ep, eo = max(1, _int(config, "expert_layer_period", 2)), _int(config, "expert_layer_offset", 1)
    experts = _int(config, "num_experts", 16) > 1
    return [
        ("attention" if i % ap == ao else "mamba") + (" moe" if experts and i % ep == eo else " dense")
        for i in range(n)
    ]


def _falcon_h1_kinds(config: Config, n: int) -> list[str]:
    return ["hybrid"] * n


def _deepseek_refusal(config: Config) -> str | None:
    freq = config.get("moe_layer_freq", 1)
    if freq not in (None, 1):
        return f"moe_layer_freq {freq} (the native classes ignore it; remote code interleaves MoE layers)"
    return None


def _gpt2_refusal(config: Config) -> str | None:
    if config.get("scale_attn_by_inverse_layer_idx"):
        return (
            "scale_attn_by_inverse_layer_idx divides attention scores by layer_idx + 1, so every layer "
            "after an inserted copy would change"
        )
    return None


def _dense_moe(dense: Any) -> str:
    return "dense" if dense else "moe"


def _moe_dense(moe: Any) -> str:
    return "moe" if moe else "dense"


def _rope(value: Any) -> str:
    return "rope" if value else "nope"


def _attention_mamba(attention: Any) -> str:
    return "attention" if attention else "mamba"


# --- shared pieces ----------------------------------------------------------------------------------------

_WB = r"\.(weight|bias)"
_O = r"self_attn\.o_proj" + _WB
_DOWN = r"mlp\.down_proj" + _WB
_EXPERTS = r"mlp\.experts\.\d+\.down_proj" + _WB  # legacy per-expert names (what save_pretrained writes)
_FUSED = r"mlp\.experts\.down_proj(_bias|_blocks)?"  # fused 3-D experts, gpt-oss bias, MXFP4 blocks
_SHARED = r"mlp\.shared_experts?\.down_proj" + _WB
_O_REQ = r"self_attn\.o_proj\.weight"
_MLP_REQ = r"mlp\.(down_proj\.weight|experts\.0\.down_proj\.weight|experts\.down_proj(_blocks)?)"
_LLAMA = (_O, _DOWN)
_LLAMA_REQ = (_O_REQ, r"mlp\.down_proj\.weight")
_MOE = (_O, _DOWN, _EXPERTS, _FUSED, _SHARED)
_MOE_REQ = (_O_REQ, _MLP_REQ)

_LABEL = str  # layer_types values are already kind words
QWEN_LAYER_TYPES = LayerField("layer_types", FieldKind.LIST, _qwen2_layer_types, label=_LABEL)
QWEN_MAX_WINDOW = LayerField(
    "max_window_layers",
    FieldKind.THRESHOLD,
    _threshold_default("max_window_layers", 28),
    relevant=lambda config: bool(config.get("use_sliding_window", False)),
)
QWEN_MOE = LayerField(
    "mlp_only_layers", FieldKind.INDEX_SET, _qwen_moe_dense, derive_always=True, label=_dense_moe
)
_STEP_1 = (("decoder_sparse_step", 1),)  # explicit mlp_only_layers carry the dense/MoE layout


def _types(derive: Callable[[Config, int], list[str]]) -> LayerField:
    return LayerField("layer_types", FieldKind.LIST, derive, periodic=True, label=_LABEL)


def _simple(name: str, zero: tuple[str, ...] = _LLAMA, notes: str = "", **kw: Any) -> Family:
    """A llama-shaped family: `model.layers.{i}.`, o_proj/down_proj (+ biases)."""
    return Family(
        name=name,
        model_types=kw.pop("model_types", (name,)),
        layer_prefix=kw.pop("layer_prefix", "model.layers."),
        zero=zero,
        required=kw.pop("required", _LLAMA_REQ),
        notes=notes,
        **kw,
    )


# In-memory parameter names (transformers 5 fuses MoE experts on load): checkpoint-key regex -> replacement;
# keys renamed to one name are one fused parameter, "" marks a buffer. Checked against named_parameters().
_FUSED_NAMES = (
    (r"\.mlp\.experts\.\d+\.(gate|up)_proj\.weight$", ".mlp.experts.gate_up_proj"),
    (r"\.mlp\.experts\.\d+\.down_proj\.weight$", ".mlp.experts.down_proj"),
)
_E_SCORE_BUFFER = ((r"^.*\.mlp\.gate\.e_score_correction_bias$", ""),)
_E_SCORE_BUFFER_MIXER = ((r"^.*\.mixer\.gate\.e_score_correction_bias$", ""),)


_MM: dict[str, Any] = (
    dict(  # multimodal checkpoints: text blocks under language_model.model, counts in text_config
        layer_prefix="language_model.model.layers.",
        config_path=("text_config",),
        roles=Roles(
            embeddings=("language_model.model.embed_tokens.weight",),
            head=("language_model.lm_head.weight",),
            final_norm=("language_model.model.norm.weight",),
        ),
    )
)
# Gemma 3 keeps its text model at model.language_model in memory; save_pretrained (5.24) writes the
# original names back, but checkpoints written from the in-memory names carry model.language_model.*.
_GEMMA3_MM: dict[str, Any] = dict(
    _MM,
    memory_prefix="model.language_model.layers.",
    alt_roots=(("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head.")),
)
_GEMMA3_TYPES = _types(_every_kth_full("sliding_window_pattern", 6, "sliding_attention"))
_LLAMA4_FIELDS = (
    LayerField(
        "no_rope_layers", FieldKind.LIST, _llama4_no_rope, empty_is_absent=True, periodic=True, label=_rope
    ),
    LayerField("moe_layers", FieldKind.INDEX_SET, _llama4_moe, periodic=True, label=_moe_dense),
    LayerField("layer_types", FieldKind.LIST, _llama4_layer_types, label=_LABEL),
)
_LLAMA4_ZERO = (
    _O,
    r"feed_forward\.down_proj" + _WB,
    r"feed_forward\.experts\.down_proj",
    r"feed_forward\.experts\.\d+\.down_proj" + _WB,
    r"feed_forward\.shared_expert\.down_proj" + _WB,
)
_LLAMA4_REQ = (_O_REQ, r"feed_forward\.(down_proj\.weight|experts\.down_proj|experts\.0\.down_proj\.weight)")
_DEEPSEEK: dict[str, Any] = dict(
    zero=_MOE,
    required=_MOE_REQ,
    refusal=_deepseek_refusal,
    extra_layers_key="num_nextn_predict_layers",
)
_MAMBA_ROLES = Roles(
    embeddings=("backbone.embeddings.weight",),
    head=("lm_head.weight",),
    final_norm=("backbone.norm_f.weight",),
)
_FINAL_LN = Roles(final_norm=("model.final_layernorm.weight", "model.final_layernorm.bias"))
_MAMBA_OUT = r"mamba\.out_proj" + _WB
_FF_DOWN = r"feed_forward\.down_proj" + _WB
_HYBRID_REQ = r"(self_attn\.o_proj|mamba\.out_proj)\.weight"


def _refused(name: str, model_types: tuple[str, ...], reason: str) -> Family:
    return Family(
        name=name, model_types=model_types, layer_prefix="model.layers.", zero=(), required=(), refuse=reason
    )


FAMILIES: tuple[Family, ...] = (
    _simple(
        "llama",
        model_types=("llama", "internlm3"),
        notes="biases with attention_bias/mlp_bias (internlm3: qkv_bias/bias)",
    ),
    _simple("mistral", notes="one global sliding_window: nothing per layer"),
    _simple(
        "qwen2", layer_fields=(QWEN_LAYER_TYPES, QWEN_MAX_WINDOW), notes="sliding = i >= max_window_layers"
    ),
    _simple("qwen3", layer_fields=(QWEN_LAYER_TYPES, QWEN_MAX_WINDOW), notes="as qwen2, plus q/k norms"),
    _simple(
        "mixtral",
        zero=(_O, r"block_sparse_moe\.experts\.\d+\.w2" + _WB, r"(block_sparse_moe|mlp)\.experts\.down_proj"),
        required=(
            _O_REQ,
            r"(block_sparse_moe\.experts\.0\.w2\.weight|(block_sparse_moe|mlp)\.experts\.down_proj)",
        ),
        memory_renames=(
            (r"\.block_sparse_moe\.experts\.\d+\.(w1|w3)\.weight$", ".mlp.experts.gate_up_proj"),
            (r"\.block_sparse_moe\.experts\.\d+\.w2\.weight$", ".mlp.experts.down_proj"),
            (r"\.block_sparse_moe\.gate\.weight$", ".mlp.gate.weight"),
        ),
        notes="every expert's w2; nothing per layer",
    ),
    _simple(
        "qwen2_moe",
        zero=_MOE,
        required=_MOE_REQ,
        layer_fields=(_types(_qwen2_moe_layer_types), QWEN_MAX_WINDOW, QWEN_MOE),
        set_keys=_STEP_1,
        memory_renames=_FUSED_NAMES,
        notes="even layers below max_window_layers slide; MoE from decoder_sparse_step/mlp_only_layers",
    ),
    _simple(
        "qwen3_moe",
        zero=_MOE,
        required=_MOE_REQ,
        layer_fields=(QWEN_MOE,),
        set_keys=_STEP_1,
        memory_renames=_FUSED_NAMES,
        notes="MoE rule as qwen2_moe",
    ),
    _simple("gemma", notes="(1+w) RMSNorm; nothing per layer"),
    _simple(
        "gemma2",
        layer_fields=(_types(_every_kth_full(None, 2, "sliding_attention")),),
        notes="even layers slide; post-norms are not zeroed",
    ),
    _simple(
        "gemma3_text",
        layer_fields=(_GEMMA3_TYPES,),
        notes="sliding unless (i+1) % sliding_window_pattern; type picks the RoPE table",
    ),
    _simple(
        "gemma3",
        layer_fields=(_GEMMA3_TYPES,),
        memory_renames=(
            (r"^vision_tower\.", "model.vision_tower."),
            (r"^multi_modal_projector\.", "model.multi_modal_projector."),
        ),
        notes="multimodal: text_config; vision tower untouched",
        **_GEMMA3_MM,
    ),
    _simple("phi3", notes="fused qkv_proj / gate_up_proj untouched"),
    _simple(
        "phi",
        zero=(r"self_attn\.dense" + _WB, r"mlp\.fc2" + _WB),
        required=(r"self_attn\.dense\.weight", r"mlp\.fc2\.weight"),
        roles=Roles(
            head=("lm_head.weight", "lm_head.bias"),
            final_norm=("model.final_layernorm.weight", "model.final_layernorm.bias"),
        ),
        notes="parallel branches, one LayerNorm",
    ),
    _simple("olmo2", notes="post-norms inside the residual branch; o/down zeroed"),
    _simple(
        "olmo3",
        layer_fields=(_types(_every_kth_full(None, 4, "sliding_attention")),),
        notes="sliding unless (i+1) % 4 == 0",
    ),
    _simple("granite", notes="residual_multiplier etc. are global"),
    _simple(
        "starcoder2",
        zero=(_O, r"mlp\.c_proj" + _WB),
        required=(_O_REQ, r"mlp\.c_proj\.weight"),
        notes="global sliding window",
    ),
    _simple(
        "gpt_neox",
        layer_prefix="gpt_neox.layers.",
        zero=(r"attention\.dense" + _WB, r"mlp\.dense_4h_to_h" + _WB),
        required=(r"attention\.dense\.weight", r"mlp\.dense_4h_to_h\.weight"),
        roles=Roles(
            embeddings=("gpt_neox.embed_in.weight",),
            head=("embed_out.weight",),
            final_norm=("gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias"),
        ),
        memory_renames=((r"^embed_out\.", "lm_head."),),
        notes="parallel or sequential residual",
    ),
    _simple(
        "falcon",
        layer_prefix="transformer.h.",
        zero=(r"self_attention\.dense" + _WB, r"mlp\.dense_4h_to_h" + _WB),
        required=(r"self_attention\.dense\.weight", r"mlp\.dense_4h_to_h\.weight"),
        roles=Roles(
            embeddings=("transformer.word_embeddings.weight",),
            final_norm=("transformer.ln_f.weight", "transformer.ln_f.bias"),
        ),
        notes="all three layouts (new decoder architecture, parallel, sequential); ALiBi or RoPE",
    ),
    _simple(
        "gpt2",
        layer_prefix="transformer.h.",
        count_key="n_layer",
        zero=(r"attn\.c_proj" + _WB, r"mlp\.c_proj" + _WB),
        required=(r"attn\.c_proj\.weight", r"mlp\.c_proj\.weight"),
        refusal=_gpt2_refusal,
        roles=Roles(
            embeddings=("transformer.wte.weight", "transformer.wpe.weight"),
            final_norm=("transformer.ln_f.weight", "transformer.ln_f.bias"),
        ),
        notes="refused with scale_attn_by_inverse_layer_idx",
    ),
    _simple("stablelm", notes="parallel or sequential; per-head q/k norms have a second index"),
    _simple("cohere", notes="parallel branches, one LayerNorm"),
    _simple(
        "cohere2",
        layer_fields=(_types(_every_kth_full("sliding_window_pattern", 4, "sliding_attention")),),
        notes="global layers are NoPE",
    ),
    _simple(
        "deepseek_v2",
        layer_fields=(
            LayerField(
                "first_k_dense_replace",
                FieldKind.THRESHOLD,
                _threshold_default("first_k_dense_replace", 0),
                required=True,
                label=_dense_moe,
            ),
        ),
        memory_renames=_FUSED_NAMES,
        notes="dense layers must stay a prefix; MTP layers renumbered",
        **_DEEPSEEK,
    ),
    _simple(
        "deepseek_v3",
        layer_fields=(
            LayerField(
                "first_k_dense_replace",
                FieldKind.THRESHOLD,
                _threshold_default("first_k_dense_replace", 3),
                required=True,
                label=_dense_moe,
            ),
        ),
        memory_renames=_FUSED_NAMES + _E_SCORE_BUFFER,
        notes="dense layers must stay a prefix; MTP layers renumbered",
        **_DEEPSEEK,
    ),
    _simple(
        "llama4_text",
        zero=_LLAMA4_ZERO,
        required=_LLAMA4_REQ,
        layer_fields=_LLAMA4_FIELDS,
        notes="no_rope_layers, moe_layers, layer_types remapped together",
    ),
    _simple(
        "llama4",
        zero=_LLAMA4_ZERO,
        required=_LLAMA4_REQ,
        layer_fields=_LLAMA4_FIELDS,
        notes="multimodal: text_config",
        **_MM,
    ),
    _simple(
        "gpt_oss",
        zero=_MOE,
        required=_MOE_REQ,
        layer_fields=(_types(_every_kth_full(None, 2, "sliding_attention")),),
        notes="fused experts incl. down_proj_bias; MXFP4 blocks zeroed, scales copied",
    ),
    _simple(
        "qwen3_next",
        zero=(*_MOE, r"linear_attn\.out_proj" + _WB),
        required=(r"(self_attn\.o_proj|linear_attn\.out_proj)\.weight", _MLP_REQ),
        layer_fields=(_types(_every_kth_full("full_attention_interval", 4, "linear_attention")), QWEN_MOE),
        set_keys=_STEP_1,
        memory_renames=_FUSED_NAMES,
        notes="linear attention (gated delta net) or full attention; MoE rule as qwen2_moe",
    ),
    _simple(
        "mamba",
        model_types=("mamba", "mamba2", "falcon_mamba"),
        layer_prefix="backbone.layers.",
        zero=(r"mixer\.out_proj" + _WB,),
        required=(r"mixer\.out_proj\.weight",),
        roles=_MAMBA_ROLES,
        notes="one mixer per layer; nothing per layer",
    ),
    _simple(
        "falcon_h1",
        zero=(_O, _MAMBA_OUT, _FF_DOWN),
        required=(_O_REQ, r"mamba\.out_proj\.weight", r"feed_forward\.down_proj\.weight"),
        layer_fields=(LayerField("mixer", FieldKind.VIRTUAL, _falcon_h1_kinds, label=_LABEL),),
        roles=_FINAL_LN,
        notes="parallel mamba + attention in every layer",
    ),
    _simple(
        "bamba",
        zero=(_O, _MAMBA_OUT, _FF_DOWN),
        required=(_HYBRID_REQ, r"feed_forward\.down_proj\.weight"),
        layer_fields=(
            LayerField(
                "attn_layer_indices", FieldKind.INDEX_SET, lambda c, n: [False] * n, label=_attention_mamba
            ),
        ),
        roles=_FINAL_LN,
        notes="attention layers listed in attn_layer_indices",
    ),
    _simple(
        "lfm2",
        zero=(r"conv\.out_proj" + _WB, r"self_attn\.out_proj" + _WB, r"feed_forward\.w2" + _WB),
        required=(r"(conv|self_attn)\.out_proj\.weight", r"feed_forward\.w2\.weight"),
        layer_fields=(
            LayerField(
                "layer_types",
                FieldKind.LIST,
                _index_set("full_attn_idxs", "conv", "full_attention"),
                label=_LABEL,
            ),
            LayerField(
                "full_attn_idxs", FieldKind.INDEX_SET, _lfm2_full, derive_always=True, write_when_absent=False
            ),
        ),
        roles=Roles(final_norm=("model.embedding_norm.weight",)),
        notes="short convolutions or attention, from layer_types (legacy: full_attn_idxs)",
    ),
    _simple(
        "granitemoehybrid",
        zero=(
            _O,
            _MAMBA_OUT,
            r"block_sparse_moe\.output_linear\.weight",
            r"shared_mlp\.output_linear\.weight",
        ),
        required=(_HYBRID_REQ, r"shared_mlp\.output_linear\.weight"),
        layer_fields=(
            LayerField("layer_types", FieldKind.LIST, lambda c, n: ["linear_attention"] * n, label=_LABEL),
            LayerField("layers_block_type", FieldKind.LIST, None, write_when_absent=False),
        ),
        memory_renames=(
            (r"\.block_sparse_moe\.input_linear\.weight$", ".block_sparse_moe.experts.gate_up_proj"),
            (r"\.block_sparse_moe\.output_linear\.weight$", ".block_sparse_moe.experts.down_proj"),
            (r"\.block_sparse_moe\.router\.layer\.weight$", ".block_sparse_moe.router.weight"),
        ),
        notes="mamba or attention from layer_types; fused 3-D experts",
    ),
    _simple(
        "nemotron_h",
        layer_prefix="backbone.layers.",
        memory_prefix="model.layers.",
        count_list="layers_block_type",
        zero=(
            r"mixer\.(out_proj|o_proj|down_proj)" + _WB,
            r"mixer\.experts\.(\d+\.)?down_proj(" + _WB + ")?",
            r"mixer\.shared_experts\.down_proj" + _WB,
        ),
        required=(r"mixer\.(out_proj|o_proj|down_proj|experts\.0\.down_proj|experts\.down_proj)(\.weight)?",),
        layer_fields=(
            LayerField("layers_block_type", FieldKind.LIST, _nemotron_types, label=_LABEL),
            LayerField(
                "hybrid_override_pattern",
                FieldKind.PATTERN,
                _nemotron_pattern,
                derive_always=True,
                write_when_absent=False,
            ),
        ),
        roles=_MAMBA_ROLES,
        memory_renames=(
            (r"\.mixer\.experts\.\d+\.up_proj\.weight$", ".mixer.experts.up_proj"),
            (r"\.mixer\.experts\.\d+\.down_proj\.weight$", ".mixer.experts.down_proj"),
            *_E_SCORE_BUFFER_MIXER,
        ),
        notes="one mixer per layer (mamba, attention, mlp, moe) from layers_block_type",
    ),
    _simple(
        "jamba",
        zero=(_O, _MAMBA_OUT, _FF_DOWN, r"feed_forward\.experts\.(\d+\.)?down_proj(" + _WB + ")?"),
        required=(_HYBRID_REQ,),
        layer_fields=(LayerField("layer_kind", FieldKind.VIRTUAL, _jamba_kinds, label=_LABEL),),
        roles=_FINAL_LN,
        memory_renames=(  # transformers 5 fuses the experts on load, as _FUSED_NAMES under feed_forward
            (r"\.feed_forward\.experts\.\d+\.(gate|up)_proj\.weight$", ".feed_forward.experts.gate_up_proj"),
            (r"\.feed_forward\.experts\.\d+\.down_proj\.weight$", ".feed_forward.experts.down_proj"),
        ),
        notes="kinds from period/offset: only whole-period copies (--every P --copies P) are expressible",
    ),
    _refused(
        "zamba",
        ("zamba", "zamba2"),
        "shared transformer blocks and adapters are indexed by hybrid-layer ordinal",
    ),
    _refused(
        "diffllama",
        ("diffllama",),
        "lambda_init depends on layer_idx, so every layer after a copy would change",
    ),
    _refused(
        "gemma3n",
        ("gemma3n", "gemma3n_text", "gemma4", "gemma4_text"),
        "per-layer embeddings and KV sharing are indexed by layer",
    ),
    _refused("gpt_neox_japanese", ("gpt_neox_japanese",), "only the last layer has a dense bias"),
)
