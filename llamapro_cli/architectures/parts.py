"""The pieces family records share: branch-final tensors (zeroed in a copy), tensors every block must
have, in-memory renames of fused MoE experts, the multimodal and mamba layouts, and the per-layer config
fields several records use (`GENERIC_FIELDS`: those any config may carry).

Tensor-name regexes are over the block-relative name and anchored at both ends (`Family.is_zeroed`
matches them with `re.fullmatch` in ASCII mode). Facts from `reference/architectures.md`.

Invariant: constants (and two small field builders), each shared or long enough to name.
Must not: hold records or logic, import torch or transformers.
"""

from __future__ import annotations

from typing import Any

from llamapro_cli.architectures import formulas as f
from llamapro_cli.architectures.record import FieldKind, Formula, LayerField, Roles, ValueKind

WB = r"\.(weight|bias)"
O_PROJ = r"self_attn\.o_proj" + WB
DOWN_PROJ = r"mlp\.down_proj" + WB
EXPERTS = r"mlp\.experts\.\d+\.down_proj" + WB  # legacy per-expert names (what save_pretrained writes)
FUSED = r"mlp\.experts\.down_proj(_bias|_blocks)?"  # fused 3-D experts, gpt-oss bias, MXFP4 blocks
SHARED = r"mlp\.shared_experts?\.down_proj" + WB
O_REQ = r"self_attn\.o_proj\.weight"
MLP_REQ = r"mlp\.(down_proj\.weight|experts\.0\.down_proj\.weight|experts\.down_proj(_blocks)?)"
LLAMA_ZERO = (O_PROJ, DOWN_PROJ)
LLAMA_REQ = (O_REQ, r"mlp\.down_proj\.weight")
MOE_ZERO = (O_PROJ, DOWN_PROJ, EXPERTS, FUSED, SHARED)
MOE_REQ = (O_REQ, MLP_REQ)
# In-memory parameter names (transformers 5 fuses MoE experts on load): checkpoint-key regex -> replacement;
# keys renamed to one name are one fused parameter, "" marks a buffer. Checked against named_parameters().
FUSED_NAMES = (
    (r"\.mlp\.experts\.\d+\.(gate|up)_proj\.weight$", ".mlp.experts.gate_up_proj"),
    (r"\.mlp\.experts\.\d+\.down_proj\.weight$", ".mlp.experts.down_proj"),
)
E_SCORE_BUFFER = ((r"^.*\.mlp\.gate\.e_score_correction_bias$", ""),)
E_SCORE_BUFFER_MIXER = ((r"^.*\.mixer\.gate\.e_score_correction_bias$", ""),)
MULTIMODAL: dict[str, Any] = (
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
GEMMA3_MULTIMODAL: dict[str, Any] = dict(
    MULTIMODAL,
    memory_prefix="model.language_model.layers.",
    alt_roots=(("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head.")),
)
LLAMA4_ZERO = (
    O_PROJ,
    r"feed_forward\.down_proj" + WB,
    r"feed_forward\.experts\.down_proj",
    r"feed_forward\.experts\.\d+\.down_proj" + WB,
    r"feed_forward\.shared_expert\.down_proj" + WB,
)
LLAMA4_REQ = (O_REQ, r"feed_forward\.(down_proj\.weight|experts\.down_proj|experts\.0\.down_proj\.weight)")
MAMBA_ROLES = Roles(
    embeddings=("backbone.embeddings.weight",),
    head=("lm_head.weight",),
    final_norm=("backbone.norm_f.weight",),
)
FINAL_LN = Roles(final_norm=("model.final_layernorm.weight", "model.final_layernorm.bias"))
MAMBA_OUT = r"mamba\.out_proj" + WB
FF_DOWN = r"feed_forward\.down_proj" + WB
HYBRID_REQ = r"(self_attn\.o_proj|mamba\.out_proj)\.weight"


# --- per-layer fields ---------------------------------------------------------------------------------

# Generic per-layer fields any config may carry: remapped by source when present, never invented.
GENERIC_FIELDS: tuple[LayerField, ...] = (
    LayerField("layer_types", FieldKind.LIST, f.FULL_ATTENTION, write_when_absent=False, label=f.kind_word),
    LayerField("mlp_layer_types", FieldKind.LIST, None, write_when_absent=False),
)


QWEN_LAYER_TYPES = LayerField("layer_types", FieldKind.LIST, f.QWEN2_LAYER_TYPES, label=f.kind_word)
QWEN_MAX_WINDOW = LayerField(
    "max_window_layers",
    FieldKind.THRESHOLD,
    f.threshold_default("max_window_layers", 28, "qwen2/configuration_qwen2.py: max_window_layers"),
    relevant=lambda config: bool(config.get("use_sliding_window", False)),
)


def qwen_moe(formula: Formula) -> LayerField:
    """Qwen's dense/MoE layout, written back as explicit `mlp_only_layers` (with decoder_sparse_step 1)."""
    return LayerField("mlp_only_layers", FieldKind.INDEX_SET, formula, derive_always=True, label=f.dense_moe)


QWEN2_MOE = qwen_moe(f.qwen_moe_dense(("num_experts",), "qwen2_moe/modeling_qwen2_moe.py"))
QWEN3_MOE = qwen_moe(
    f.qwen_moe_dense(("num_local_experts", "num_experts"), "qwen3_moe/modeling_qwen3_moe.py")
)
QWEN3_NEXT_MOE = qwen_moe(f.qwen_moe_dense(("num_experts",), "qwen3_next/modeling_qwen3_next.py"))
STEP_1 = (("decoder_sparse_step", 1),)  # explicit mlp_only_layers carry the dense/MoE layout


def periodic_types(derive: Formula) -> LayerField:
    """`layer_types` following an index pattern engines may re-derive (a broken pattern is warned about)."""
    return LayerField("layer_types", FieldKind.LIST, derive, periodic=True, label=f.kind_word)


GEMMA3_TYPES = periodic_types(
    f.every_kth_full(
        "sliding_window_pattern", 6, "sliding_attention", "gemma3/configuration_gemma3.py: layer_types"
    )
)
LLAMA4_FIELDS = (
    LayerField(
        "no_rope_layers",
        FieldKind.LIST,
        f.LLAMA4_NO_ROPE,
        empty_is_absent=True,
        periodic=True,
        label=f.rope,
        values=ValueKind.INTEGERS,
    ),
    LayerField("moe_layers", FieldKind.INDEX_SET, f.LLAMA4_MOE, periodic=True, label=f.moe_dense),
    LayerField("layer_types", FieldKind.LIST, f.LLAMA4_LAYER_TYPES, label=f.kind_word),
)
QWEN3_NEXT_TYPES = f.every_kth_full(
    "full_attention_interval", 4, "linear_attention", "qwen3_next/configuration_qwen3_next.py: layer_types"
)


def first_k_dense(default: int, source: str) -> LayerField:
    """DeepSeek's dense-below-threshold layout: required to stay a prefix (a plan that breaks it: exit 2)."""
    formula = f.threshold_default("first_k_dense_replace", default, f"{source}: dense below the threshold")
    return LayerField("first_k_dense_replace", FieldKind.THRESHOLD, formula, required=True, label=f.dense_moe)
