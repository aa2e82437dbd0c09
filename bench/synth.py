"""Synthetic Llama (and Qwen2) checkpoints of real shapes for the benchmark.

Shapes are those of real models (TinyLlama 1.1B, LLaMA-2 7B, LLaMA-2 70B, Qwen2.5 0.5B); files are laid
out the way `transformers.save_pretrained` lays them out (tensors split into shards in state-dict order,
each shard's header sorted by name as the safetensors library writes it, an index when sharded). Values
are finite bf16: one 64 MiB block of N(0, 0.02) float32 rounded down to bf16 bit patterns, repeated with a
per-tensor phase. Tensors are therefore not distinct from one another (nothing here depends on that:
the tools under test move bytes), but every value is a real, finite number.

`headers_only=True` writes each shard's header and extends the file to its full size with ftruncate:
a sparse file that costs no disk and is enough for `inspect` and `expand --dry-run` (70B).

Must not: use the writer under test (llamapro's own `write_shard`).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

BLOCK = 64 * 1024 * 1024


@dataclass(frozen=True)
class Shape:
    name: str
    label: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    max_shard: int  # bytes, as the original repository was saved
    context: int
    # Qwen2 (`model_type` "qwen2"): q/k/v biases, tied embeddings, and a sliding window on the layers from
    # `max_window_layers` up: a per-layer attention pattern, which is what a layer map must carry over.
    model_type: str = "llama"
    max_window_layers: int = 0
    sliding_window: int = 0

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) in state-dict order."""
        h, kv = self.hidden, self.hidden // self.heads * self.kv_heads
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            if self.qwen2:
                out += [(p + "self_attn.q_proj.bias", (h,))]
                out += [(p + f"self_attn.{x}_proj.bias", (kv,)) for x in "kv"]
            out += [
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (self.intermediate, h)),
                (p + "mlp.up_proj.weight", (self.intermediate, h)),
                (p + "mlp.down_proj.weight", (h, self.intermediate)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        out.append(("model.norm.weight", (h,)))
        return out if self.qwen2 else [*out, ("lm_head.weight", (self.vocab, h))]  # qwen2: tied

    @property
    def qwen2(self) -> bool:
        return self.model_type == "qwen2"

    def nbytes(self) -> int:
        return sum(2 * int(np.prod(s)) for _, s in self.tensors())

    def config(self) -> dict[str, object]:
        if self.qwen2:
            return self.qwen2_config()
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "num_hidden_layers": self.layers,
            "vocab_size": self.vocab,
            "max_position_embeddings": self.context,
            "rms_norm_eps": 1e-05,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "attention_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "bfloat16",
        }

    def qwen2_config(self) -> dict[str, object]:
        """As Qwen2.5's hub configs are written (no `layer_types`: transformers derives it from
        `use_sliding_window`, `sliding_window` and `max_window_layers`), with the window switched on."""
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "num_hidden_layers": self.layers,
            "vocab_size": self.vocab,
            "max_position_embeddings": self.context,
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "hidden_act": "silu",
            "use_sliding_window": True,
            "sliding_window": self.sliding_window,
            "max_window_layers": self.max_window_layers,
            "tie_word_embeddings": True,
            "bos_token_id": 151643,
            "eos_token_id": 151643,
            "torch_dtype": "bfloat16",
        }


SHAPES = {
    "1b": Shape("1b", "TinyLlama 1.1B", 22, 2048, 5632, 32, 4, 32000, 5 * 10**9, 2048),
    "7b": Shape("7b", "LLaMA-2 7B", 32, 4096, 11008, 32, 32, 32000, 10 * 10**9, 4096),
    "70b": Shape("70b", "LLaMA-2 70B", 80, 8192, 28672, 64, 8, 32000, 10 * 10**9, 4096),
    "qwen2-0.5b": Shape(
        "qwen2-0.5b",
        "Qwen2.5 0.5B (sliding window on)",
        24,
        896,
        4864,
        14,
        2,
        151936,
        5 * 10**9,
        32768,
        model_type="qwen2",
        max_window_layers=21,
        sliding_window=4096,
    ),
}


def _split(shape: Shape) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in shape.tensors():
        n = 2 * int(np.prod(dims))
        if shards[-1] and size + n > shape.max_shard:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += n
    return shards


def _header(tensors: list[tuple[str, tuple[int, ...]]]) -> bytes:
    # As the safetensors library writes it: metadata first, names sorted, padded with spaces to 8 bytes.
    doc: dict[str, object] = {"__metadata__": {"format": "pt"}}
    position = 0
    for name, dims in sorted(tensors):
        n = 2 * int(np.prod(dims))
        doc[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [position, position + n]}
        position += n
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _random_block(seed: int) -> memoryview:
    """Twice the same 64 MiB of bf16 bits, so that any 64 MiB window is one contiguous slice."""
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal(BLOCK // 2, dtype=np.float32) * 0.02).view(np.uint32)
    bf16 = (values >> 16).astype(np.uint16)  # truncation of a finite float32 is a finite bf16
    return memoryview(np.concatenate([bf16, bf16]).tobytes())


def _write_data(fd: int, block: memoryview, tensors: list[tuple[str, tuple[int, ...]]]) -> None:
    for index, (_, dims) in enumerate(sorted(tensors)):
        remaining, phase = 2 * int(np.prod(dims)), (index * 7_919_993 * 2) % BLOCK
        while remaining:
            n = min(remaining, BLOCK)
            view = block[phase : phase + n]
            while view:
                view = view[os.write(fd, view) :]
            remaining -= n


def generate(shape: Shape, root: Path, *, headers_only: bool = False) -> Path:
    """Create (or reuse) the checkpoint folder for `shape` under `root`; return its path."""
    folder = root / (f"{shape.name}-headers" if headers_only else shape.name)
    stamp = folder / ".complete"
    spec = json.dumps({**asdict(shape), "headers_only": headers_only}, sort_keys=True)
    if stamp.is_file() and stamp.read_text() == spec:
        return folder
    if folder.exists():
        for f in folder.iterdir():
            f.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    shards = _split(shape)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    block = None if headers_only else _random_block(seed=0)
    for fname, tensors in zip(names, shards, strict=True):
        head = _header(tensors)
        data = sum(2 * int(np.prod(d)) for _, d in tensors)
        fd = os.open(folder / fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, head)
            if block is None:
                os.ftruncate(fd, len(head) + data)
            else:
                _write_data(fd, block, tensors)
        finally:
            os.close(fd)
    if len(shards) > 1:
        weight_map = {n: f for f, ts in zip(names, shards, strict=True) for n, _ in ts}
        index = {"metadata": {"total_size": shape.nbytes()}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(shape.config(), indent=2) + "\n")
    ids = {k: shape.config()[k] for k in ("bos_token_id", "eos_token_id")}
    (folder / "generation_config.json").write_text(json.dumps(ids) + "\n")
    os.sync()
    stamp.write_text(spec)
    return folder
