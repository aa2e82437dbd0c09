"""A built-in demo checkpoint: a small Llama with seeded finite weights, so `make demo` needs no download.

Real Llama layout and tensor names (config.json as transformers writes it for LlamaForCausalLM),
bf16 weights drawn from N(0, 0.02) with norms near 1, sharded with an index like hub checkpoints.
Written with the `safetensors` library, not our own writer, so the demo exercises a real input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DEMO_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "vocab_size": 1024,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}


def write_demo_checkpoint(dest: Path, *, seed: int = 0, layers: int = 8) -> Path:
    """Write the demo checkpoint into `dest` (created; must not exist) and return it."""
    import torch
    from safetensors.torch import save_file

    config = {**DEMO_CONFIG, "num_hidden_layers": layers}
    gen = torch.Generator().manual_seed(seed)
    tensors = _tensors(config, gen)
    dest.mkdir(parents=True)
    names = list(tensors)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(dest / fname), metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": {k: fname for fname, keys in shards.items() for k in keys},
    }
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen_cfg = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}
    (dest / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    (dest / "README.md").write_text(
        "# llamapro demo checkpoint\n\nSeeded random weights; not a trained model.\n"
    )
    return dest


def _tensors(config: dict[str, Any], gen: Any) -> dict[str, Any]:
    import torch

    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d = config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d

    def normal(*shape: int) -> Any:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    def norm() -> Any:
        return (1.0 + torch.randn(h, generator=gen) * 0.05).to(torch.bfloat16)

    out: dict[str, Any] = {"model.embed_tokens.weight": normal(v, h)}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out |= {
            p + "input_layernorm.weight": norm(),
            p + "self_attn.q_proj.weight": normal(q, h),
            p + "self_attn.k_proj.weight": normal(kv, h),
            p + "self_attn.v_proj.weight": normal(kv, h),
            p + "self_attn.o_proj.weight": normal(h, q),
            p + "post_attention_layernorm.weight": norm(),
            p + "mlp.gate_proj.weight": normal(i, h),
            p + "mlp.up_proj.weight": normal(i, h),
            p + "mlp.down_proj.weight": normal(h, i),
        }
    out["model.norm.weight"] = norm()
    out["lm_head.weight"] = normal(v, h)
    return out
