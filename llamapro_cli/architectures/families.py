"""Every supported (or explicitly refused) model family, as data: one `Family` record each, in `FAMILIES`.

Facts come from `reference/architectures.md` (measured on transformers 5.24) and are re-checked by
`tests/test_families.py`, which expands a tiny model of every family and compares logits bit for bit.
A record names the block prefix on disk, the branch-final tensors a copy must zero (weights *and*
biases, every routed and shared expert, legacy per-expert and fused 3-D forms, MXFP4 `*_blocks`), the
tensors every layer must have, and the per-layer config fields with transformers' default formula
(`formulas.py`). `GENERIC_FIELDS` are the per-layer fields any config may carry.

Invariant: records only; a new family is a new record (plus, at most, a formula in `formulas.py`).
Must not: hold logic (the registry and the per-layer engine apply records), import torch or transformers.
"""

from __future__ import annotations

from typing import Any

from llamapro_cli.architectures import formulas as f
from llamapro_cli.architectures import parts as p
from llamapro_cli.architectures.record import Family, FieldKind, LayerField, Roles


def _simple(name: str, zero: tuple[str, ...] = p.LLAMA_ZERO, notes: str = "", **kw: Any) -> Family:
    """A llama-shaped family: `model.layers.{i}.`, o_proj/down_proj (+ biases)."""
    return Family(
        name=name,
        model_types=kw.pop("model_types", (name,)),
        layer_prefix=kw.pop("layer_prefix", "model.layers."),
        zero=zero,
        required=kw.pop("required", p.LLAMA_REQ),
        notes=notes,
        **kw,
    )


_DEEPSEEK: dict[str, Any] = dict(
    zero=p.MOE_ZERO,
    required=p.MOE_REQ,
    refusal=f.deepseek_refusal,
    reads=f.DEEPSEEK_READS,
    extra_layers_key="num_nextn_predict_layers",
)


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
        "qwen2",
        layer_fields=(p.QWEN_LAYER_TYPES, p.QWEN_MAX_WINDOW),
        notes="sliding = i >= max_window_layers",
    ),
    _simple("qwen3", layer_fields=(p.QWEN_LAYER_TYPES, p.QWEN_MAX_WINDOW), notes="as qwen2, plus q/k norms"),
    _simple(
        "mixtral",
        zero=(
            p.O_PROJ,
            r"block_sparse_moe\.experts\.\d+\.w2" + p.WB,
            r"(block_sparse_moe|mlp)\.experts\.down_proj",
        ),
        required=(
            p.O_REQ,
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
        zero=p.MOE_ZERO,
        required=p.MOE_REQ,
        layer_fields=(p.periodic_types(f.QWEN2_MOE_LAYER_TYPES), p.QWEN_MAX_WINDOW, p.QWEN2_MOE),
        set_keys=p.STEP_1,
        memory_renames=p.FUSED_NAMES,
        notes="even layers below max_window_layers slide; MoE from decoder_sparse_step/mlp_only_layers",
    ),
    _simple(
        "qwen3_moe",
        zero=p.MOE_ZERO,
        required=p.MOE_REQ,
        layer_fields=(p.QWEN3_MOE,),
        set_keys=p.STEP_1,
        memory_renames=p.FUSED_NAMES,
        notes="MoE rule as qwen2_moe",
    ),
    _simple("gemma", notes="(1+w) RMSNorm; nothing per layer"),
    _simple(
        "gemma2",
        layer_fields=(
            p.periodic_types(
                f.every_kth_full(None, 2, "sliding_attention", "gemma2/configuration_gemma2.py")
            ),
        ),
        notes="even layers slide; post-norms are not zeroed",
    ),
    _simple(
        "gemma3_text",
        layer_fields=(p.GEMMA3_TYPES,),
        notes="sliding unless (i+1) % sliding_window_pattern; type picks the RoPE table",
    ),
    _simple(
        "gemma3",
        layer_fields=(p.GEMMA3_TYPES,),
        memory_renames=(
            (r"^vision_tower\.", "model.vision_tower."),
            (r"^multi_modal_projector\.", "model.multi_modal_projector."),
        ),
        notes="multimodal: text_config; vision tower untouched",
        **p.GEMMA3_MULTIMODAL,
    ),
    _simple("phi3", notes="fused qkv_proj / gate_up_proj untouched"),
    _simple(
        "phi",
        zero=(r"self_attn\.dense" + p.WB, r"mlp\.fc2" + p.WB),
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
        layer_fields=(
            p.periodic_types(f.every_kth_full(None, 4, "sliding_attention", "olmo3/configuration_olmo3.py")),
        ),
        notes="sliding unless (i+1) % 4 == 0",
    ),
    _simple("granite", notes="residual_multiplier etc. are global"),
    _simple(
        "starcoder2",
        zero=(p.O_PROJ, r"mlp\.c_proj" + p.WB),
        required=(p.O_REQ, r"mlp\.c_proj\.weight"),
        notes="global sliding window",
    ),
    _simple(
        "gpt_neox",
        layer_prefix="gpt_neox.layers.",
        zero=(r"attention\.dense" + p.WB, r"mlp\.dense_4h_to_h" + p.WB),
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
        zero=(r"self_attention\.dense" + p.WB, r"mlp\.dense_4h_to_h" + p.WB),
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
        zero=(r"attn\.c_proj" + p.WB, r"mlp\.c_proj" + p.WB),
        required=(r"attn\.c_proj\.weight", r"mlp\.c_proj\.weight"),
        refusal=f.gpt2_refusal,
        reads=f.GPT2_READS,
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
        layer_fields=(
            p.periodic_types(
                f.every_kth_full(
                    "sliding_window_pattern", 4, "sliding_attention", "cohere2/configuration_cohere2.py"
                )
            ),
        ),
        notes="global layers are NoPE",
    ),
    _simple(
        "deepseek_v2",
        layer_fields=(p.first_k_dense(0, "deepseek_v2/modeling_deepseek_v2.py"),),
        memory_renames=p.FUSED_NAMES,
        notes="dense layers must stay a prefix; MTP layers renumbered",
        **_DEEPSEEK,
    ),
    _simple(
        "deepseek_v3",
        layer_fields=(p.first_k_dense(3, "deepseek_v3/modeling_deepseek_v3.py"),),
        memory_renames=p.FUSED_NAMES + p.E_SCORE_BUFFER,
        notes="dense layers must stay a prefix; MTP layers renumbered",
        **_DEEPSEEK,
    ),
    _simple(
        "llama4_text",
        zero=p.LLAMA4_ZERO,
        required=p.LLAMA4_REQ,
        layer_fields=p.LLAMA4_FIELDS,
        notes="no_rope_layers, moe_layers, layer_types remapped together",
    ),
    _simple(
        "llama4",
        zero=p.LLAMA4_ZERO,
        required=p.LLAMA4_REQ,
        layer_fields=p.LLAMA4_FIELDS,
        notes="multimodal: text_config",
        **p.MULTIMODAL,
    ),
    _simple(
        "gpt_oss",
        zero=p.MOE_ZERO,
        required=p.MOE_REQ,
        layer_fields=(
            p.periodic_types(
                f.every_kth_full(None, 2, "sliding_attention", "gpt_oss/configuration_gpt_oss.py")
            ),
        ),
        notes="fused experts incl. down_proj_bias; MXFP4 blocks zeroed, scales copied",
    ),
    _simple(
        "qwen3_next",
        zero=(*p.MOE_ZERO, r"linear_attn\.out_proj" + p.WB),
        required=(r"(self_attn\.o_proj|linear_attn\.out_proj)\.weight", p.MLP_REQ),
        layer_fields=(p.periodic_types(p.QWEN3_NEXT_TYPES), p.QWEN3_NEXT_MOE),
        set_keys=p.STEP_1,
        memory_renames=p.FUSED_NAMES,
        notes="linear attention (gated delta net) or full attention; MoE rule as qwen2_moe",
    ),
    _simple(
        "mamba",
        model_types=("mamba", "mamba2", "falcon_mamba"),
        layer_prefix="backbone.layers.",
        zero=(r"mixer\.out_proj" + p.WB,),
        required=(r"mixer\.out_proj\.weight",),
        roles=p.MAMBA_ROLES,
        notes="one mixer per layer; nothing per layer",
    ),
    _simple(
        "falcon_h1",
        zero=(p.O_PROJ, p.MAMBA_OUT, p.FF_DOWN),
        required=(p.O_REQ, r"mamba\.out_proj\.weight", r"feed_forward\.down_proj\.weight"),
        layer_fields=(LayerField("mixer", FieldKind.VIRTUAL, f.FALCON_H1_MIXER, label=f.kind_word),),
        roles=p.FINAL_LN,
        notes="parallel mamba + attention in every layer",
    ),
    _simple(
        "bamba",
        zero=(p.O_PROJ, p.MAMBA_OUT, p.FF_DOWN),
        required=(p.HYBRID_REQ, r"feed_forward\.down_proj\.weight"),
        layer_fields=(
            LayerField("attn_layer_indices", FieldKind.INDEX_SET, f.BAMBA_ATTENTION, label=f.attention_mamba),
        ),
        roles=p.FINAL_LN,
        notes="attention layers listed in attn_layer_indices",
    ),
    _simple(
        "lfm2",
        zero=(r"conv\.out_proj" + p.WB, r"self_attn\.out_proj" + p.WB, r"feed_forward\.w2" + p.WB),
        required=(r"(conv|self_attn)\.out_proj\.weight", r"feed_forward\.w2\.weight"),
        layer_fields=(
            LayerField(
                "layer_types",
                FieldKind.LIST,
                f.LFM2_LAYER_TYPES,
                label=f.kind_word,
            ),
            LayerField(
                "full_attn_idxs",
                FieldKind.INDEX_SET,
                f.LFM2_FULL_ATTENTION,
                derive_always=True,
                write_when_absent=False,
            ),
        ),
        roles=Roles(final_norm=("model.embedding_norm.weight",)),
        notes="short convolutions or attention, from layer_types (legacy: full_attn_idxs)",
    ),
    _simple(
        "granitemoehybrid",
        zero=(
            p.O_PROJ,
            p.MAMBA_OUT,
            r"block_sparse_moe\.output_linear\.weight",
            r"shared_mlp\.output_linear\.weight",
        ),
        required=(p.HYBRID_REQ, r"shared_mlp\.output_linear\.weight"),
        layer_fields=(
            LayerField("layer_types", FieldKind.LIST, f.GRANITE_HYBRID_TYPES, label=f.kind_word),
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
            r"mixer\.(out_proj|o_proj|down_proj)" + p.WB,
            r"mixer\.experts\.(\d+\.)?down_proj(" + p.WB + ")?",
            r"mixer\.shared_experts\.down_proj" + p.WB,
        ),
        required=(r"mixer\.(out_proj|o_proj|down_proj|experts\.0\.down_proj|experts\.down_proj)(\.weight)?",),
        layer_fields=(
            LayerField("layers_block_type", FieldKind.LIST, f.NEMOTRON_TYPES, label=f.kind_word),
            LayerField(
                "hybrid_override_pattern",
                FieldKind.PATTERN,
                f.NEMOTRON_PATTERN,
                derive_always=True,
                write_when_absent=False,
            ),
        ),
        roles=p.MAMBA_ROLES,
        memory_renames=(
            (r"\.mixer\.experts\.\d+\.up_proj\.weight$", ".mixer.experts.up_proj"),
            (r"\.mixer\.experts\.\d+\.down_proj\.weight$", ".mixer.experts.down_proj"),
            *p.E_SCORE_BUFFER_MIXER,
        ),
        notes="one mixer per layer (mamba, attention, mlp, moe) from layers_block_type",
    ),
    _simple(
        "jamba",
        zero=(p.O_PROJ, p.MAMBA_OUT, p.FF_DOWN, r"feed_forward\.experts\.(\d+\.)?down_proj(" + p.WB + ")?"),
        required=(p.HYBRID_REQ,),
        layer_fields=(LayerField("layer_kind", FieldKind.VIRTUAL, f.JAMBA_KINDS, label=f.kind_word),),
        roles=p.FINAL_LN,
        memory_renames=(  # transformers 5 fuses the experts on load, as FUSED_NAMES under feed_forward
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
