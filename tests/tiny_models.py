"""Tiny transformers checkpoints and the logits oracle every identity test uses.

Owns: building tiny seeded models of each supported family from their transformers config classes (no
downloads), loading them strictly (no missing/unexpected/mismatched keys: transformers only *warns* and
random-initialises gaps), and comparing base vs expanded logits bit for bit (full forward, cached decoding,
greedy generation).

Invariant: every comparison is `torch.equal`, never allclose; an expansion that is not exact fails.

Must not: be imported by the product, download anything, or hold two models in memory at once.
`reference_expand` is a deliberately naive in-memory expander that exists only to test this oracle.
"""

from __future__ import annotations

import gc
import inspect
import json
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file

# Shape shared by every family: small enough to build in ~0.1 s, big enough for GQA and windows.
COMMON_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 6,
    "vocab_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
NOISE_STD = 0.08  # added to every parameter, so norm weights != 1 and biases != 0
WINDOW = 4  # sliding window where a family has one; test sequences must be longer
BLOCK_PREFIX = "model.layers."  # on-disk block prefix of every family in FAMILIES


@dataclass(frozen=True)
class Variant:
    """One checkpoint flavour: config overrides plus edits applied to the saved config.json."""

    config: Mapping[str, Any] = field(default_factory=dict)
    max_shard_size: str | None = None
    min_shards: int = 1
    drop_keys: tuple[str, ...] = ()  # removed from config.json after saving (legacy hub configs)
    rename_keys: Mapping[str, str] = field(default_factory=dict)  # config.json key aliases
    layer_types: bool | None = None  # True: config.json must list them; False: must not; None: don't care
    add_keys: Mapping[str, Any] = field(default_factory=dict)  # set in config.json after saving


@dataclass(frozen=True)
class Family:
    config_class: str  # name in the `transformers` namespace
    config: Mapping[str, Any]
    variants: Mapping[str, Variant]
    nest: str | None = None  # multimodal: COMMON_CONFIG and variant overrides go into config[nest]
    # False would compare full-forward logits only. No family needs it: the oracle compares base-cached with
    # expanded-cached, which is exact for every family (a model's cached logits differ from its own full
    # forward by ~1e-6 in every family, llama included, and by 0.1 in bamba, but that is never compared).
    cached: bool = True
    seq_len: int = 16  # longer than every window/chunk the family has (incl. hard-coded ones)
    block_prefix: str = BLOCK_PREFIX  # on-disk block prefix
    # Cached decoding of a 1-output linear (Qwen's shared_expert_gate) rounds differently with the data
    # pointer's alignment, which follows the tensor's file offset (safetensors mmap): compare on copies.
    realign: bool = False
    # Built with this class (a name in `transformers`); load_model picks it from config.json's
    # `architectures`. AutoModelForCausalLM gives the text-only class for some multimodal configs (llama4).
    model_class: str = "AutoModelForCausalLM"


_QWEN_SLIDING = {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 3}
_QWEN_VARIANTS = {
    "default": Variant(config={"use_sliding_window": False}),
    "sliding": Variant(config=_QWEN_SLIDING, layer_types=True),
    # Many hub configs predate `layer_types`: transformers re-derives it from `max_window_layers`.
    "sliding_legacy": Variant(config=_QWEN_SLIDING, drop_keys=("layer_types",), layer_types=False),
}

FAMILIES: dict[str, Family] = {
    "llama": Family(
        config_class="LlamaConfig",
        config={},
        variants={
            "default": Variant(),
            "tied": Variant(config={"tie_word_embeddings": True}),
            "bias": Variant(config={"attention_bias": True, "mlp_bias": True}),
            "sharded": Variant(max_shard_size="200KB", min_shards=3),
        },
    ),
    "mistral": Family(
        config_class="MistralConfig",
        config={"sliding_window": WINDOW},
        variants={"default": Variant()},
    ),
    "qwen2": Family(config_class="Qwen2Config", config={}, variants=_QWEN_VARIANTS),
    # Qwen3's default head_dim is 128 regardless of hidden size.
    "qwen3": Family(config_class="Qwen3Config", config={"head_dim": 16}, variants=_QWEN_VARIANTS),
    # Served by the Llama classes; InternLM3Config maps qkv_bias -> attention_bias, bias -> mlp_bias
    # (and requires them equal). LlamaConfig itself has no such aliases in transformers 5.24.
    "internlm3": Family(
        config_class="InternLM3Config",
        config={"head_dim": 16},
        variants={
            "default": Variant(),
            "qkv_bias": Variant(
                config={"attention_bias": True, "mlp_bias": True},
                rename_keys={"attention_bias": "qkv_bias", "mlp_bias": "bias"},
            ),
        },
    ),
}


# --- the zoo (issue 5): one entry per family, windows/chunks of WINDOW, patterns that insert points break.
_D = Variant()
_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
# MoE on (i+1) % 2 == 0 except layer 3: MoE layers 1, 5; dense 0, 2, 3, 4.
_QWEN_MOE = {**_MOE, "decoder_sparse_step": 2, "mlp_only_layers": [3], "shared_expert_intermediate_size": 64}
_DEEPSEEK = {
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "n_shared_experts": 1,
    "first_k_dense_replace": 2,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "n_group": 1,
    "topk_group": 1,
    "num_key_value_heads": 4,  # MLA: one latent KV per head
}
_LEGACY_TYPES = Variant(drop_keys=("layer_types",), layer_types=False)
_SLIDING = Variant(layer_types=True)
_SMALL_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 28,
    "patch_size": 14,
}
# MoE 1, 3, 5; NoPE 2, 5; chunked attention on the RoPE layers.
_LLAMA4_TEXT = {
    "head_dim": 16,
    "intermediate_size_mlp": 96,
    "num_local_experts": 4,
    "num_experts_per_tok": 1,
    "interleave_moe_layer_step": 2,
    "no_rope_layer_interval": 3,
    "attention_chunk_size": WINDOW,
    "pad_token_id": 0,
}
_MAMBA2 = {
    "mamba_n_heads": 8,
    "mamba_d_head": 16,
    "mamba_n_groups": 1,
    "mamba_d_state": 16,
    "mamba_chunk_size": 4,
}

FAMILIES.update(
    {
        "mixtral": Family(
            config_class="MixtralConfig",
            config={"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": WINDOW},
            variants={"default": _D},
        ),
        "qwen2_moe": Family(
            config_class="Qwen2MoeConfig",
            config={
                **_QWEN_MOE,
                "use_sliding_window": True,
                "sliding_window": WINDOW,
                "max_window_layers": 4,
            },
            variants={"default": _SLIDING, "legacy": _LEGACY_TYPES},
            realign=True,
        ),
        "qwen3_moe": Family(
            config_class="Qwen3MoeConfig", config={**_QWEN_MOE, "head_dim": 16}, variants={"default": _D}
        ),
        "gemma": Family(config_class="GemmaConfig", config={"head_dim": 16}, variants={"default": _D}),
        "gemma2": Family(
            config_class="Gemma2Config",
            config={"head_dim": 16, "sliding_window": WINDOW},
            variants={"default": _SLIDING, "legacy": _LEGACY_TYPES},
        ),
        "gemma3_text": Family(
            config_class="Gemma3TextConfig",
            config={"head_dim": 16, "sliding_window": WINDOW, "sliding_window_pattern": 3},
            variants={"default": _SLIDING, "legacy": _LEGACY_TYPES},
        ),
        "gemma3": Family(
            config_class="Gemma3Config",
            config={
                "text_config": {"head_dim": 16, "sliding_window": WINDOW, "sliding_window_pattern": 3},
                "vision_config": _SMALL_VISION,
                "mm_tokens_per_image": 4,
                "image_token_index": 127,
                "boi_token_index": 125,
                "eoi_token_index": 126,
            },
            variants={"default": _SLIDING, "legacy": _LEGACY_TYPES},
            nest="text_config",
            block_prefix="language_model.model.layers.",
        ),
        "phi3": Family(
            config_class="Phi3Config",
            config={"sliding_window": WINDOW, "pad_token_id": 0},
            variants={"default": _D},
        ),
        "phi": Family(
            config_class="PhiConfig",
            config={},
            variants={"default": _D, "qk_layernorm": Variant(config={"qk_layernorm": True})},
        ),
        "olmo2": Family(config_class="Olmo2Config", config={"pad_token_id": 0}, variants={"default": _D}),
        "olmo3": Family(
            config_class="Olmo3Config",
            config={"pad_token_id": 0, "sliding_window": WINDOW},
            variants={"default": _SLIDING, "legacy": _LEGACY_TYPES},
        ),
        "granite": Family(
            config_class="GraniteConfig",
            config={
                "residual_multiplier": 0.5,
                "embedding_multiplier": 2.0,
                "attention_multiplier": 0.1,
                "logits_scaling": 2.0,
                "attention_bias": True,
                "mlp_bias": True,
            },
            variants={"default": _D},
        ),
        "starcoder2": Family(
            config_class="Starcoder2Config",
            config={"sliding_window": WINDOW, "use_bias": True},
            variants={"default": _D},
        ),
        "gpt_neox": Family(
            config_class="GPTNeoXConfig",
            config={},
            variants={"default": _D, "sequential": Variant(config={"use_parallel_residual": False})},
            block_prefix="gpt_neox.layers.",
        ),
        "falcon": Family(
            config_class="FalconConfig",
            config={"bias": True},
            variants={
                # Falcon-40B/180B style: grouped KV heads, ln_attn + ln_mlp.
                "new_arch": Variant(config={"new_decoder_architecture": True, "num_kv_heads": 2}),
                # Falcon-7B style: multi-query, one input_layernorm feeding both branches, ALiBi off.
                "parallel": Variant(config={"multi_query": True, "parallel_attn": True}),
                # Sequential blocks with ALiBi: input_layernorm + post_attention_layernorm.
                "sequential": Variant(config={"parallel_attn": False, "alibi": True, "multi_query": False}),
            },
            block_prefix="transformer.h.",
        ),
        "stablelm": Family(
            config_class="StableLmConfig",
            config={},
            variants={
                "default": _D,
                "parallel_qk_norm": Variant(config={"use_parallel_residual": True, "qk_layernorm": True}),
            },
        ),
        "cohere": Family(
            config_class="CohereConfig",
            config={"pad_token_id": 0, "use_qk_norm": True},
            variants={"default": _D},
        ),
        "cohere2": Family(
            config_class="Cohere2Config",
            config={"pad_token_id": 0, "sliding_window": WINDOW},
            variants={"default": _SLIDING, "legacy": _LEGACY_TYPES},
        ),
        "deepseek_v2": Family(config_class="DeepseekV2Config", config=_DEEPSEEK, variants={"default": _D}),
        "deepseek_v3": Family(config_class="DeepseekV3Config", config=_DEEPSEEK, variants={"default": _D}),
        "llama4_text": Family(
            config_class="Llama4TextConfig",
            config=_LLAMA4_TEXT,
            variants={
                "default": _D,
                "legacy": Variant(drop_keys=("layer_types", "no_rope_layers", "moe_layers")),
            },
        ),
        # Multimodal Llama 4: text blocks under language_model.model.layers, lists in text_config.
        "llama4": Family(
            config_class="Llama4Config",
            config={
                "text_config": _LLAMA4_TEXT,
                "vision_config": {
                    **_SMALL_VISION,
                    "vision_output_dim": 32,
                    "projector_input_dim": 32,
                    "projector_output_dim": 32,
                },
                "image_token_index": 127,
                "boi_token_index": 125,
                "eoi_token_index": 126,
            },
            variants={
                "default": _D,
                "legacy": Variant(drop_keys=("layer_types", "no_rope_layers", "moe_layers")),
            },
            nest="text_config",
            block_prefix="language_model.model.layers.",
            model_class="Llama4ForConditionalGeneration",
        ),
        "gpt_oss": Family(
            config_class="GptOssConfig",
            config={
                "head_dim": 16,
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "sliding_window": WINDOW,
            },
            variants={"default": _SLIDING, "legacy": _LEGACY_TYPES},
        ),
        "qwen3_next": Family(
            config_class="Qwen3NextConfig",
            config={
                **_QWEN_MOE,
                "head_dim": 16,
                "linear_num_key_heads": 2,
                "linear_num_value_heads": 4,
                "linear_key_head_dim": 16,
                "linear_value_head_dim": 16,
                "full_attention_interval": 3,
            },
            # The config class consumes full_attention_interval; hub configs that predate layer_types keep it.
            variants={
                "default": _D,
                "legacy": Variant(drop_keys=("layer_types",), add_keys={"full_attention_interval": 3}),
            },
            seq_len=72,  # the torch gated-delta rule works in hard-coded chunks of 64
            realign=True,
        ),
        "jamba": Family(
            config_class="JambaConfig",
            config={
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "attn_layer_period": 2,
                "attn_layer_offset": 1,
                "expert_layer_period": 2,
                "expert_layer_offset": 1,
                "mamba_d_state": 8,
                "mamba_dt_rank": 8,
                "use_mamba_kernels": False,
                "pad_token_id": 0,
            },
            variants={"default": _D},
        ),
        "gpt2": Family(
            config_class="GPT2Config",
            config={"n_embd": 64, "n_layer": 6, "n_head": 4, "n_positions": 256},
            variants={
                "default": _D,
                "inverse_layer_idx": Variant(config={"scale_attn_by_inverse_layer_idx": True}),
            },
            block_prefix="transformer.h.",
        ),
        "mamba": Family(
            config_class="MambaConfig",
            config={"state_size": 8},
            variants={"default": _D},
            block_prefix="backbone.layers.",
        ),
        # Mamba with RMS norms on its B/C/dt projections (a model_type of the registry's mamba family).
        "falcon_mamba": Family(
            config_class="FalconMambaConfig",
            config={"state_size": 8},
            variants={"default": _D},
            block_prefix="backbone.layers.",
        ),
        "mamba2": Family(
            config_class="Mamba2Config",
            config={"num_heads": 8, "head_dim": 16, "n_groups": 1, "state_size": 16, "chunk_size": WINDOW},
            variants={"default": _D},
            block_prefix="backbone.layers.",
        ),
        "falcon_h1": Family(
            config_class="FalconH1Config",
            config={**_MAMBA2, "mamba_d_ssm": 128, "head_dim": 16},
            variants={"default": _D},
        ),
        "bamba": Family(
            config_class="BambaConfig",
            config={**_MAMBA2, "attn_layer_indices": [2, 5]},
            variants={"default": _D},
        ),
        "lfm2": Family(
            config_class="Lfm2Config",
            config={"layer_types": None, "full_attn_idxs": [2, 5], "pad_token_id": 0},
            variants={"default": _D, "legacy": Variant(drop_keys=("layer_types",))},
        ),
        "granitemoehybrid": Family(
            config_class="GraniteMoeHybridConfig",
            config={
                **_MAMBA2,
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "shared_intermediate_size": 64,
                "residual_multiplier": 0.5,
                "layer_types": ["mamba", "mamba", "attention", "mamba", "mamba", "attention"],
            },
            variants={"default": _D},
        ),
        "nemotron_h": Family(
            config_class="NemotronHConfig",
            config={
                "head_dim": 16,
                "mamba_num_heads": 8,
                "mamba_head_dim": 16,
                "n_groups": 1,
                "ssm_state_size": 16,
                "chunk_size": WINDOW,
                "n_routed_experts": 4,
                "num_experts_per_tok": 2,
                "moe_intermediate_size": 32,
                "moe_shared_expert_intermediate_size": 32,
                "layers_block_type": ["mamba", "moe", "attention", "mamba", "mlp", "moe"],
                "use_mamba_kernels": False,
            },
            variants={
                "default": _D,
                # Hub configs before layers_block_type: a pattern string and num_hidden_layers.
                "legacy": Variant(
                    drop_keys=("layers_block_type",),
                    add_keys={"hybrid_override_pattern": "ME*M-E", "num_hidden_layers": 6},
                ),
            },
            block_prefix="backbone.layers.",
        ),
    }
)


# The llama-shaped families `reference_expand` (the oracle's self-test expander) can handle.
CORE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "internlm3")


def all_variants(families: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """Every (family, variant) pair (of `families`, default all), for parametrisation."""
    names = FAMILIES if families is None else families
    return [(fam, var) for fam in names for var in FAMILIES[fam].variants]


def _dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return value


def build_tiny(
    family: str,
    dest: Path,
    *,
    variant: str = "default",
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: str | None = None,
) -> Path:
    """Build, perturb and save a tiny `family`/`variant` checkpoint in `dest`; return `dest`."""
    spec = FAMILIES[family]
    var = spec.variants[variant]
    config_cls = getattr(transformers, spec.config_class)
    config = config_cls(**_config_kwargs(spec, var))
    model_cls = getattr(transformers, spec.model_class)
    with torch.random.fork_rng(devices=[]):  # keep the global RNG untouched
        torch.manual_seed(seed)
        model = model_cls.from_config(config) if spec.model_class.startswith("Auto") else model_cls(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):  # sorted: noise independent of module order
            param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * NOISE_STD)
    model.to(_dtype(dtype)).eval()
    dest = Path(dest)
    shard = max_shard_size or var.max_shard_size
    model.save_pretrained(dest, max_shard_size=shard) if shard else model.save_pretrained(dest)
    del model
    _edit_saved_config(dest, var)
    _check_saved(dest, var)
    return dest


def _config_kwargs(spec: Family, var: Variant) -> dict[str, Any]:
    if spec.nest is None:
        return {**COMMON_CONFIG, **spec.config, **var.config}
    inner = {**COMMON_CONFIG, **spec.config.get(spec.nest, {}), **var.config}
    return {**spec.config, spec.nest: inner}


def _edit_saved_config(dest: Path, var: Variant) -> None:
    if not (var.drop_keys or var.rename_keys or var.add_keys):
        return
    path = dest / "config.json"
    raw = json.loads(path.read_text())
    cfg = raw.get("text_config") or raw  # legacy edits apply to the text decoder's config
    for key in var.drop_keys:
        del cfg[key]
    for old, new in var.rename_keys.items():
        cfg[new] = cfg.pop(old)
    cfg.update(var.add_keys)
    path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def _check_saved(dest: Path, var: Variant) -> None:
    cfg = read_config(dest)
    if var.layer_types is True:
        assert "sliding_attention" in cfg.get("layer_types", ()), f"{dest}: expected explicit layer_types"
    elif var.layer_types is False:
        assert "layer_types" not in cfg, f"{dest}: legacy config must not carry layer_types"
    shards = sorted(dest.glob("*.safetensors"))
    assert len(shards) >= var.min_shards, f"{dest}: {len(shards)} shards, wanted >= {var.min_shards}"
    if len(shards) > 1:
        assert (dest / "model.safetensors.index.json").is_file(), f"{dest}: sharded without an index"


def read_config(path: Path) -> dict[str, Any]:
    """The text-decoder part of config.json (`text_config` when nested)."""
    cfg: dict[str, Any] = json.loads((Path(path) / "config.json").read_text())
    return cfg.get("text_config") or cfg


def num_layers(path: Path) -> int:
    cfg = read_config(path)
    for key in ("num_hidden_layers", "n_layer"):  # gpt2 spells it n_layer
        if key in cfg:
            return int(cfg[key])
    return len(cfg["layers_block_type"])  # nemotron_h: the count is the length of its kind list


def load_model(path: Path, *, dtype: torch.dtype = torch.float32, attn: str = "eager") -> Any:
    """Load strictly: any missing, unexpected or mismatched key (or error message) is an AssertionError."""
    model, info = _model_class(path).from_pretrained(
        path, output_loading_info=True, dtype=dtype, attn_implementation=attn
    )
    problems = {
        key: sorted(map(str, info.get(key) or ()))
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
    }
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        raise AssertionError(f"loading {path} was not clean: {problems}")
    return model.eval()


def _model_class(path: Path) -> Any:
    """The multimodal class config.json names, else AutoModelForCausalLM (which maps gemma3 to its
    ForConditionalGeneration class but llama4 to the text-only one, which would not load the weights)."""
    names = json.loads((Path(path) / "config.json").read_text()).get("architectures") or []
    name = names[0] if names else ""
    if name.endswith("ForConditionalGeneration") and hasattr(transformers, name):
        return getattr(transformers, name)
    return transformers.AutoModelForCausalLM


# transformers 5.24's Llama4ForConditionalGeneration.forward reads `outputs.image_outputs`, which its text
# model's output lacks, so every call with return_dict raises. Without pixel_values its forward is its
# language_model on the same embeddings: the oracle runs that (the weights were still loaded strictly).
_BROKEN_FORWARD = ("Llama4ForConditionalGeneration",)


def _text_path(model: Any) -> Any:
    return model.language_model if type(model).__name__ in _BROKEN_FORWARD else model


@torch.no_grad()
def logits_full(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, use_cache=False).logits


@torch.no_grad()
def logits_cached(model: Any, input_ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Prefill `prefill` tokens, then decode the rest one at a time through the KV cache."""
    # transformers 5.24 renamed `past_key_values` to `cache` (input and output); the old name warns.
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=input_ids[:, :prefill], use_cache=True)
    pieces = [out.logits]
    for t in range(prefill, input_ids.shape[1]):
        out = model(input_ids=input_ids[:, t : t + 1], use_cache=True, **{name: getattr(out, name)})
        pieces.append(out.logits)
    return torch.cat(pieces, dim=1)


@torch.no_grad()
def greedy(model: Any, input_ids: torch.Tensor, new_tokens: int = 8) -> torch.Tensor:
    """Greedy `generate`; EOS is suppressed so every row produces exactly `new_tokens` tokens."""
    gen_config = transformers.GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        generation_config=gen_config,
    )


def _windows(cfg: Mapping[str, Any]) -> list[int]:
    keys = ("sliding_window", "attention_chunk_size")
    return [int(v) for k in keys if isinstance(v := cfg.get(k), int) and v > 0]


def _outputs(
    path: Path,
    ids: torch.Tensor,
    prefill: int,
    attn: str,
    dtype: torch.dtype,
    cached: bool = True,
    realign: bool = False,
) -> dict[str, Any]:
    model = _text_path(load_model(path, dtype=dtype, attn=attn))
    if realign:
        with torch.no_grad():
            for param in model.parameters():
                param.data = param.data.clone()  # fresh, allocator-aligned memory instead of the mmap
    try:
        if not cached:
            return {"full": logits_full(model, ids)}
        return {
            "full": logits_full(model, ids),
            "cached": logits_cached(model, ids, prefill),
            "greedy": greedy(model, ids),
        }
    finally:
        del model
        gc.collect()


def assert_identical(
    base_dir: Path,
    expanded_dir: Path,
    *,
    seq_len: int = 16,
    batch: int = 2,
    seed: int = 0,
    attn: str = "eager",
    dtype: torch.dtype = torch.float32,
    cached: bool = True,
    realign: bool = False,
) -> None:
    """Assert the expanded checkpoint has more layers and bit-identical logits and greedy tokens.

    `cached=False` compares full-sequence logits only (no family needs it: see `Family.cached`)."""
    n_base, n_exp = num_layers(base_dir), num_layers(expanded_dir)
    assert n_exp > n_base, f"expanded model has {n_exp} layers, base {n_base}: comparison would be vacuous"
    cfg = read_config(base_dir)
    prefill = seq_len // 2
    too_small = [w for w in _windows(cfg) + _windows(read_config(expanded_dir)) if seq_len <= w]
    assert not too_small, f"seq_len {seq_len} does not exceed sliding windows {too_small}"
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, int(cfg["vocab_size"]), (batch, seq_len), generator=gen)
    base = _outputs(base_dir, ids, prefill, attn, dtype, cached, realign)
    expanded = _outputs(expanded_dir, ids, prefill, attn, dtype, cached, realign)
    failures = []
    for name, ref in base.items():
        got = expanded[name]
        if ref.shape != got.shape:
            failures.append(f"{name}: shape {tuple(ref.shape)} != {tuple(got.shape)}")
        elif ref.is_floating_point() and not torch.equal(ref, got):
            delta = (ref.double() - got.double()).abs().max().item()
            failures.append(f"{name}: max |Δ| = {delta:.6g}")
        elif not torch.equal(ref, got):
            failures.append(f"{name}: {int((ref != got).sum())} of {ref.numel()} tokens differ")
    assert not failures, f"{expanded_dir} differs from {base_dir} ({attn}, {dtype}): " + "; ".join(failures)


# ---------------------------------------------------------------------------------------------------
# Self-test only: a naive expander used to prove the oracle passes exact expansions and catches wrong ones.

_LAYER_RE = re.compile(re.escape(BLOCK_PREFIX) + r"(\d+)\.(.+)")


def sources(n_layers: int, after: Sequence[int]) -> list[int]:
    """Source layer of each new layer: a copy of layer k goes right after layer k."""
    out: list[int] = []
    for i in range(n_layers):
        out.append(i)
        if i in after:
            out.append(i)
    return out


def zero_residual_writers(name: str) -> bool:
    """The LLaMA Pro zero set for llama-like blocks: o_proj and down_proj, weights and biases."""
    return name.startswith(("self_attn.o_proj.", "mlp.down_proj."))


def reference_config_edit(after: Sequence[int]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Correct config rewrite for the families here: remap/write `layer_types` by source and move the
    qwen `max_window_layers` threshold to the number of new layers whose source lies below it."""

    def edit(cfg: dict[str, Any]) -> dict[str, Any]:
        n_old = cfg["num_hidden_layers"] - len(after)
        src = sources(n_old, after)
        types = cfg.get("layer_types")
        if types is None and "max_window_layers" in cfg:  # legacy qwen: derive as transformers does
            sliding = cfg.get("use_sliding_window") and cfg.get("sliding_window") is not None
            threshold = cfg["max_window_layers"]
            types = [
                "sliding_attention" if sliding and i >= threshold else "full_attention" for i in range(n_old)
            ]
        if types is not None:
            cfg["layer_types"] = [types[s] for s in src]
        if "max_window_layers" in cfg:
            cfg["max_window_layers"] = sum(s < cfg["max_window_layers"] for s in src)
        return cfg

    return edit


def reference_expand(
    src_dir: Path,
    dst_dir: Path,
    after: list[int],
    zero: Callable[[str], bool],
    config_edit: Callable[[dict[str, Any]], dict[str, Any]] = lambda cfg: cfg,
) -> Path:
    """Insert a copy of each layer in `after` right after it, zero the copies' tensors whose block-relative
    name satisfies `zero`, renumber, and write one model.safetensors. config.json gets the new
    `num_hidden_layers`, then `config_edit` (which sees the already-updated count)."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(src_dir.glob("*.safetensors")):
        state.update(load_file(shard))
    n_old = num_layers(src_dir)
    blocks: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(n_old)}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        m = _LAYER_RE.fullmatch(key)
        if m:
            blocks[int(m.group(1))][m.group(2)] = tensor
        else:
            out[key] = tensor
    src = sources(n_old, after)
    for j, s in enumerate(src):
        is_copy = j > 0 and src[j - 1] == s
        for rel, tensor in blocks[s].items():
            new = torch.zeros_like(tensor) if is_copy and zero(rel) else tensor.clone()
            out[f"{BLOCK_PREFIX}{j}.{rel}"] = new
    dst_dir.mkdir(parents=True, exist_ok=True)
    save_file(out, dst_dir / "model.safetensors", metadata={"format": "pt"})
    for extra in src_dir.iterdir():
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in _NOT_COPIED:
            shutil.copy2(extra, dst_dir / extra.name)
    raw = json.loads((src_dir / "config.json").read_text())
    text = raw.get("text_config") or raw
    text["num_hidden_layers"] = len(src)
    edited = config_edit(text)
    if "text_config" in raw:
        raw["text_config"] = edited
    else:
        raw = edited
    (dst_dir / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    return dst_dir


_NOT_COPIED = {"config.json", "model.safetensors.index.json"}


# ---------------------------------------------------------------------------------------------------
# The oracle of a layer map (`relayer`): the source model's own layers run in the mapped order, by hand.

# Config keys whose value is a set of layer indices (read at forward time by some families, e.g. Bamba's
# `layers_block_type` property derives from `attn_layer_indices`): remapped as indices, not per position.
_INDEX_SET_SUFFIXES = ("_indices", "_idxs", "_layers")


def _decoder_layers(model: Any, n_layers: int) -> tuple[Any, str]:
    """The (parent module, attribute) holding the decoder's layer list: the one ModuleList named
    `layers` or `h` of the model's depth."""
    found = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList)
        and len(module) == n_layers
        and name.split(".")[-1] in ("layers", "h")
    ]
    assert len(found) == 1, f"expected one decoder layer list of {n_layers}, found {found}"
    parent, _, attr = found[0].rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


def _remap_config(config: Any, entries: Sequence[tuple[int, bool]], n_layers: int) -> None:
    """Per-layer values the model reads at forward time follow their layer: lists with one entry per
    layer by source, index sets by membership of the source; the layer count is the map's."""
    new_count = len(entries)
    for key, value in list(vars(config).items()):
        if not isinstance(value, list) or key == "architectures":
            continue
        if len(value) == n_layers and not any(isinstance(v, (dict, list)) for v in value):
            setattr(config, key, [value[s] for s, _ in entries])
        elif key.endswith(_INDEX_SET_SUFFIXES) and all(type(v) is int and 0 <= v < n_layers for v in value):
            members = set(value)
            setattr(config, key, [j for j, (s, _) in enumerate(entries) if s in members])
    for key in ("num_hidden_layers", "n_layer"):
        if key in vars(config):
            setattr(config, key, new_count)


def relayered_reference(
    base_dir: Path, entries: Sequence[tuple[int, bool]], zero: Callable[[str], bool]
) -> Any:
    """The base model whose decoder runs deep copies of its own layers in `entries` order ((source,
    zeroed) pairs, as `layer_map.parse_spec` gives): zeroed copies get every parameter whose
    block-relative in-memory name satisfies `zero` set to 0; each copy's layer_idx is its new position
    (the cache slot), every other attribute (attention type, sliding, RoPE) stays its source's."""
    import copy

    model = load_model(base_dir)
    n_layers = num_layers(base_dir)
    parent, attr = _decoder_layers(model, n_layers)
    layers = getattr(parent, attr)
    new = torch.nn.ModuleList()
    for j, (source, zeroed) in enumerate(entries):
        layer = copy.deepcopy(layers[source])
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = j
        if zeroed:
            with torch.no_grad():
                for name, param in layer.named_parameters():
                    if zero(name):
                        param.zero_()
        new.append(layer)
    setattr(parent, attr, new)
    configs = {
        id(c): c for c in (model.config, model.config.get_text_config(), getattr(parent, "config", None)) if c
    }
    for config in configs.values():
        _remap_config(config, entries, n_layers)
    return model.eval()


@torch.no_grad()
def forward_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Full-forward logits, every parameter first moved to fresh allocator-aligned memory (rounding of
    some kernels follows the data pointer's alignment, and a deep copy is not where an mmap is)."""
    for param in model.parameters():
        param.data = param.data.clone()
    return logits_full(_text_path(model), input_ids)
