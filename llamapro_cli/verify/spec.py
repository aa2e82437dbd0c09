"""What transformers would build from a checkpoint's config, for the native engine (`model.py`).

Resolves config.json into a `Spec`: head layout checked against the weight shapes, which linears carry a
bias, each layer's sliding window, and the rotary tables (`Rope`: modeling_rope_utils types default,
linear, dynamic, llama3, yarn). The per-layer rules are ported here independently of `architectures.py`,
so a wrong formula there cannot hide from the check. Anything the engine cannot run is an
`UnsupportedError` (exit 3) with a hint to use the transformers engine.

Must not: read tensor data (shapes come from the headers). Imports torch: load it lazily.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.errors import InputError, UnsupportedError

# model_type -> the modeling code that runs it (InternLM3 is served by the Llama classes).
MODELING = {"llama": "llama", "internlm3": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
SUPPORTED_FAMILIES: frozenset[str] = frozenset(MODELING.values())
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
_MAX_POSITIONS = {"llama": 2048, "mistral": 131072, "qwen2": 32768, "qwen3": 32768, "internlm3": 32768}
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
KV = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Rope:
    """Rotary tables as transformers computes them: inv_freq in fp32 on the CPU, cos/sin times a scale."""

    kind: str
    theta: float
    dim: int
    max_positions: int
    params: Mapping[str, Any]

    def inv_freq(self, seq_len: int) -> tuple[torch.Tensor, float]:
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim
        if self.kind == "dynamic" and seq_len > self.max_positions:
            # Dynamic NTK: a call reaching past max_position_embeddings grows the base (tensor math, as
            # transformers does it for its longest position; shorter calls use the plain frequencies).
            factor, seq = float(self.params["factor"]), torch.tensor(seq_len)
            grow = ((factor * seq / self.max_positions) - (factor - 1)) ** (self.dim / (self.dim - 2))
            return 1.0 / ((self.theta * grow) ** exponents), 1.0
        inv = 1.0 / (self.theta**exponents)
        if self.kind == "linear":
            return inv / float(self.params["factor"]), 1.0
        if self.kind == "llama3":
            return _llama3(inv, self.params), 1.0
        if self.kind == "yarn":
            return _yarn(self)
        return inv, 1.0

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> KV:
        inv, scale = self.inv_freq(int(positions.max()) + 1)
        freqs = positions[None, :, None].float() * inv.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scale).to(dtype)[:, None], (emb.sin() * scale).to(dtype)[:, None]


def _llama3(inv: torch.Tensor, p: Mapping[str, Any]) -> torch.Tensor:
    factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
    old = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)  # long wavelengths: divided by factor
    smooth = (old / wavelen - low) / (high - low)  # in between: interpolated
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    return torch.where(~(wavelen < old / high) * ~(wavelen > old / low), smoothed, scaled)


def _yarn(rope: Rope) -> tuple[torch.Tensor, float]:
    p, dim, base = rope.params, rope.dim, rope.theta
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or rope.max_positions / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    attention = p.get("attention_factor")
    if attention is None:
        both = p.get("mscale") and p.get("mscale_all_dim")
        attention = (
            mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"]) if both else mscale(factor)
        )
    low, high = correction_dim(p.get("beta_fast") or 32), correction_dim(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = (torch.arange(dim // 2, dtype=torch.float32) - low) / (
        (high + 0.001 if low == high else high) - low
    )
    keep = 1 - torch.clamp(ramp, 0, 1)  # high frequencies extrapolate, low ones interpolate
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep, float(attention)


@dataclass(frozen=True)
class Spec:
    """What the forward needs from config.json and the tensor shapes, resolved as transformers does."""

    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    windows: tuple[int | None, ...]  # per layer: the sliding window, or None for full attention
    biased: frozenset[str]  # block-relative linears that carry a bias
    qk_norm: bool  # qwen3: RMSNorm of each query / key head before RoPE
    tied: bool  # the head is the embedding matrix
    rope: Rope


def read_spec(ckpt: Checkpoint) -> Spec:
    """Resolve a checkpoint's config; UnsupportedError (exit 3) for anything this engine cannot run."""
    cfg, model_type = ckpt.config, str(ckpt.config.get("model_type"))
    modeling = MODELING.get(model_type)
    if modeling is None or sys.byteorder != "little":
        raise UnsupportedError(
            f"the native engine cannot run model_type {model_type!r} on this machine",
            hint="use --engine transformers; native runs " + ", ".join(sorted(MODELING)),
        )
    if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
        raise UnsupportedError(f"config.json: hidden_act {cfg['hidden_act']!r} (the native engine runs silu)")
    heads = cfg.get("num_attention_heads")
    q_rows = _layer0_shape(ckpt, "self_attn.q_proj.weight")[0]
    if not isinstance(heads, int) or heads < 1 or q_rows % heads:
        raise InputError(f"config.json: num_attention_heads {heads!r} does not divide q_proj's {q_rows} rows")
    head_dim = q_rows // heads
    kv_heads = _layer0_shape(ckpt, "self_attn.k_proj.weight")[0] // head_dim
    for key, value in (("head_dim", head_dim), ("num_key_value_heads", kv_heads)):
        if cfg.get(key) not in (None, value):
            raise InputError(f"config.json: {key} {cfg.get(key)} does not fit the q/k_proj shapes ({value})")
    return Spec(
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        eps=float(cfg.get("rms_norm_eps", 1e-5 if model_type == "internlm3" else 1e-6)),
        windows=_windows(modeling, cfg, ckpt.num_layers),
        biased=_biased(modeling, cfg),
        qk_norm=modeling == "qwen3",
        tied=bool(cfg.get("tie_word_embeddings", False)) or ckpt.family.roles.head[0] not in ckpt.weight_map,
        rope=_rope(cfg, head_dim, _MAX_POSITIONS[model_type]),
    )


def _layer0_shape(ckpt: Checkpoint, rel: str) -> tuple[int, ...]:
    name = f"{ckpt.family.layer_prefix}0.{rel}"
    if name not in ckpt.weight_map:
        raise InputError(f"{ckpt.root}: tensor {name} is missing")
    return ckpt.info(name).shape


def _biased(modeling: str, cfg: Mapping[str, Any]) -> frozenset[str]:
    """Which linears have a bias, as each modeling file builds them (not whatever the shards hold)."""
    if modeling == "qwen2":
        return frozenset(QKV)  # q/k/v always, o and the MLP never
    if modeling == "mistral":
        return frozenset()
    internlm3 = cfg.get("model_type") == "internlm3"  # InternLM3Config: qkv_bias / bias are aliases
    attn = cfg.get("attention_bias", cfg.get("qkv_bias", False) if internlm3 else False)
    mlp = modeling == "llama" and cfg.get("mlp_bias", cfg.get("bias", False) if internlm3 else False)
    return frozenset(((*QKV, "self_attn.o_proj") if attn else ()) + (MLP if mlp else ()))


def _windows(modeling: str, cfg: Mapping[str, Any], n: int) -> tuple[int | None, ...]:
    if modeling == "llama":
        return (None,) * n
    if modeling == "mistral":  # one global window; MistralModel ignores a layer_types list
        return (cfg.get("sliding_window", 4096),) * n
    # qwen2 / qwen3 (configuration_qwen2.py): the window is nulled unless use_sliding_window; without an
    # explicit layer_types, layers i >= max_window_layers slide.
    window = cfg.get("sliding_window", 4096) if cfg.get("use_sliding_window", False) else None
    types = cfg.get("layer_types")
    if types is None:
        upper = cfg.get("max_window_layers", 28)
        types = ["sliding_attention" if window and i >= upper else "full_attention" for i in range(n)]
    if not isinstance(types, list) or len(types) != n:
        raise InputError(f"config.json: layer_types must list one type for each of the {n} layers")
    for i, kind in enumerate(types):
        if kind not in ("full_attention", "sliding_attention"):
            raise UnsupportedError(f"config.json: layer_types[{i}] is {kind!r} (native runs full/sliding)")
        if kind == "sliding_attention" and not (isinstance(window, int) and window > 0):
            raise InputError(
                f"config.json: layer {i} is sliding_attention but no sliding_window is in effect"
            )
    return tuple(window if kind == "sliding_attention" else None for kind in types)


def _rope(cfg: Mapping[str, Any], head_dim: int, default_max: int) -> Rope:
    # transformers 5 writes rope_parameters (theta inside); older configs rope_scaling + top-level rope_theta.
    params = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    if any(isinstance(v, Mapping) for v in params.values()):
        raise UnsupportedError(
            "config.json: per-layer-type rope parameters are not supported by the native engine"
        )
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise UnsupportedError(
            f"config.json: rope type {kind!r} is not supported by the native engine",
            hint="use --engine transformers; native supports rope types " + ", ".join(ROPE_TYPES),
        )
    if params.get("partial_rotary_factor", cfg.get("partial_rotary_factor")) not in (None, 1, 1.0):
        raise UnsupportedError("config.json: partial_rotary_factor is not supported by the native engine")
    max_positions = int(cfg.get("max_position_embeddings") or default_max)
    if kind in ("llama3", "yarn"):  # a top-level value wins, as in standardize_rope_params
        original = cfg.get("original_max_position_embeddings", params.get("original_max_position_embeddings"))
        params["original_max_position_embeddings"] = original or max_positions
    needs = {
        "linear": ("factor",),
        "dynamic": ("factor",),
        "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    }
    for key in needs.get(kind, ()):
        if not isinstance(params.get(key), int | float):
            raise InputError(f"config.json: rope type {kind!r} needs a numeric {key}")
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    return Rope(kind=kind, theta=theta, dim=head_dim, max_positions=max_positions, params=params)
