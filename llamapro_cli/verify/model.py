"""The native engine's model: a small, readable Llama-family forward pass, one block resident at a time.

Read it like gpt-fast's `model.py`: `Model` is a checkpoint being run (weights read on demand, the K/V
cache), `block()` is a decoder layer (`h + attn(norm(h))`, then `+ mlp(norm(h))`), `rms_norm`, the rotary
embedding and attention are the plain functions below, and `forward_logits()` / `cached_logits()` run one
model (the tests hold them to transformers' logits). `lockstep.py` drives two models side by side.

Numerics follow transformers 5's eager path (modeling_llama / mistral / qwen2 / qwen3) op for op: RMSNorm
in fp32, cast back, times the weight; RoPE tables in fp32 cast to the activation dtype (`spec.Rope`: types
default, linear, dynamic, llama3, yarn); scores in the activation dtype plus a mask of 0 / finfo.min;
softmax in fp32, cast back. A sliding window w lets query i see keys j with i - w < j <= i
(masking_utils.sliding_window_overlay); the K/V cache keeps every position and masks instead of dropping.
Per-layer behaviour is read from config.json with transformers' own defaults, ported in `spec.py`
independently of `architectures/`, so a wrong formula there cannot hide from this check.

Invariant: weights are read with `os.preadv` into fresh buffers (no mmap) and dropped after use, so at most
one block, or the prompt's embedding rows, or the final norm + head are resident (`Meter`, in checkpoint
bytes).
Must not: grow into a model zoo (a family here is a Llama block plus config switches), print.
This module imports torch at import time: import it lazily, inside functions that compute numbers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.errors import InputError, UnsupportedError
from llamapro_cli.io.ranges import read_into
from llamapro_cli.verify.spec import KV, MLP, QKV, read_spec

LOGIT_CHUNK_BYTES = 64 << 20  # the head writes at most this many bytes of logits at a time

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
_LINEARS = (*QKV, "self_attn.o_proj", *MLP)


# --- one checkpoint being run: weights on demand, K/V cache ------------------------------------------


@dataclass
class Meter:
    """Checkpoint bytes of weights resident now, at most, and read in all (shared by both models)."""

    resident: int = 0
    peak: int = 0
    total: int = 0

    def hold(self, nbytes: int) -> None:
        self.resident += nbytes
        self.total += nbytes
        self.peak = max(self.peak, self.resident)


class Model:
    """A checkpoint being run: its spec, open shard files, the meter, and every layer's K/V cache."""

    def __init__(self, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, meter: Meter) -> None:
        self.ckpt, self.spec, self.meter = ckpt, read_spec(ckpt), meter
        self.device, self.dtype = device, dtype
        self.cache: list[KV | None] = [None] * ckpt.num_layers
        self._fds: dict[str, int] = {}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _read(self, name: str, skip: int = 0, size: int | None = None) -> torch.Tensor:
        """Bytes of (a slice of) a tensor as a 1-D tensor of its dtype, read into a fresh buffer; counted."""
        info = self.ckpt.info(name)
        if info.dtype not in _DTYPES:
            raise UnsupportedError(f"tensor {name} is {info.dtype}; the native engine runs BF16/F16/F32")
        path, offset = self.ckpt.location(name)
        if str(path) not in self._fds:
            self._fds[str(path)] = os.open(path, os.O_RDONLY)
        size = info.nbytes if size is None else size
        buf = bytearray(size)  # a fresh, writable buffer the tensor owns (no mmap: memory is what we hold)
        read_into(self._fds[str(path)], memoryview(buf), offset + skip, path)
        self.meter.hold(size)
        return torch.frombuffer(buf, dtype=torch.uint8).view(_DTYPES[info.dtype])  # safetensors is LE

    @contextmanager
    def weights(self, names: Iterable[str]) -> Iterator[dict[str, torch.Tensor]]:
        """Whole tensors, in the run's device and dtype, for the duration of a `with`; freed after."""
        loaded: dict[str, torch.Tensor] = {}
        held = self.meter.resident
        try:
            for name in names:
                if name not in self.ckpt.weight_map:
                    raise InputError(f"{self.ckpt.root}: tensor {name} is missing (the config needs it)")
                shape = self.ckpt.info(name).shape
                loaded[name] = self._read(name).reshape(shape).to(self.device, self.dtype)
            yield loaded
        finally:
            loaded.clear()
            self.meter.resident = held

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The prompt's embedding rows, read row by row: the matrix itself is never loaded here."""
        name = self.ckpt.family.roles.embeddings[0]
        info = self.ckpt.info(name)
        if int(ids.min()) < 0 or int(ids.max()) >= info.shape[0]:
            raise InputError(f"token ids must lie in [0, {info.shape[0]}) for {self.ckpt.root}")
        unique, inverse = torch.unique(ids, return_inverse=True)
        row, held = info.nbytes // info.shape[0], self.meter.resident
        table = torch.stack([self._read(name, t * row, row) for t in unique.tolist()])
        self.meter.resident = held
        return table.to(self.device, self.dtype)[inverse.to(self.device)]

    def block(self, j: int, h: torch.Tensor, step: Step) -> torch.Tensor:
        """Decoder layer j: h + attn(norm(h)), then + mlp(norm(h))."""
        prefix, s = f"{self.ckpt.family.layer_prefix}{j}.", self.spec
        rel = [
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            *(f"{x}.weight" for x in _LINEARS),
        ]
        rel += [f"{x}.bias" for x in sorted(s.biased)]
        rel += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"] if s.qk_norm else []
        with self.weights(prefix + r for r in rel) as loaded:
            w = {r: loaded[prefix + r] for r in rel}
            h = h + self._attention(w, rms_norm(h, w["input_layernorm.weight"], s.eps), j, step)
            x = rms_norm(h, w["post_attention_layernorm.weight"], s.eps)
            gate, up = F.silu(_linear(x, w, "mlp.gate_proj")), _linear(x, w, "mlp.up_proj")  # SwiGLU
            return h + _linear(gate * up, w, "mlp.down_proj")

    def _attention(self, w: dict[str, torch.Tensor], x: torch.Tensor, j: int, step: Step) -> torch.Tensor:
        s, (batch, length, _) = self.spec, x.shape
        q, k, v = (_linear(x, w, lin).view(batch, length, -1, s.head_dim) for lin in QKV)
        if s.qk_norm:
            q, k = (
                rms_norm(q, w["self_attn.q_norm.weight"], s.eps),
                rms_norm(k, w["self_attn.k_norm.weight"], s.eps),
            )
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (batch, heads, length, head_dim)
        q, k = q * step.cos + _rotate_half(q) * step.sin, k * step.cos + _rotate_half(k) * step.sin
        k, v = self._remember(j, k, v, step.keep)
        groups = s.heads // s.kv_heads  # GQA: each K/V head serves `groups` query heads
        k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
        scores = torch.matmul(q, k.transpose(2, 3)) * s.head_dim**-0.5 + step.mask(s.windows[j])
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).contiguous().reshape(batch, length, -1)
        return _linear(out, w, "self_attn.o_proj")

    def _remember(self, j: int, k: torch.Tensor, v: torch.Tensor, keep: int) -> KV:
        """Layer j's cached K/V followed by the new; the first `keep` positions stay cached."""
        old = self.cache[j]
        if old is not None:
            k, v = torch.cat((old[0], k), dim=2), torch.cat((old[1], v), dim=2)
        self.cache[j] = (k[:, :, :keep].contiguous(), v[:, :, :keep].contiguous()) if keep else None
        return k, v

    def logits(self, h: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(first position, logits) chunks of final norm + head, so a 128K vocabulary never makes them all."""
        roles = self.ckpt.family.roles
        norm, head = roles.final_norm[0], roles.embeddings[0] if self.spec.tied else roles.head[0]
        with self.weights([norm, head]) as w:
            x = rms_norm(h, w[norm], self.spec.eps)
            chunk = max(1, LOGIT_CHUNK_BYTES // (w[head].shape[0] * x.element_size() * x.shape[0]))
            for t in range(0, x.shape[1], chunk):
                yield t, F.linear(x[:, t : t + chunk], w[head])

    def step(self, start: int, length: int, keep: int) -> Step:
        positions = torch.arange(start, start + length, device=self.device)
        return Step(positions, keep, self.spec.rope.tables(positions, self.dtype), self.dtype)


class Step:
    """One call over `length` new tokens from absolute position `start`: rotary tables and masks."""

    def __init__(self, positions: torch.Tensor, keep: int, rope: KV, dtype: torch.dtype) -> None:
        self.positions, self.keep, (self.cos, self.sin), self.dtype = positions, keep, rope, dtype
        self._masks: dict[int | None, torch.Tensor] = {}

    def mask(self, window: int | None) -> torch.Tensor:
        """Additive (queries, keys) mask over every position so far: causal, and within the window."""
        if window not in self._masks:
            q = self.positions[:, None]
            kv = torch.arange(int(self.positions[-1]) + 1, device=q.device)[None, :]
            allowed = (kv <= q) & ((kv > q - window) if window else True)
            zero = torch.zeros((), dtype=self.dtype, device=q.device)
            self._masks[window] = torch.where(allowed, zero, torch.finfo(self.dtype).min)
        return self._masks[window]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    y = x.to(torch.float32)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def _linear(x: torch.Tensor, w: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, heads, length, dim = x.shape
    return x[:, :, None].expand(b, heads, groups, length, dim).reshape(b, heads * groups, length, dim)


# --- running one model ----------------------------------------------------------------------------------


@contextmanager
def opened(ckpt: Checkpoint, device: str | torch.device, dtype: torch.dtype, meter: Meter) -> Iterator[Model]:
    model = Model(ckpt, torch.device(device), dtype, meter)
    try:
        yield model
    finally:
        model.close()


def as_batch(input_ids: torch.Tensor) -> torch.Tensor:
    ids = input_ids if input_ids.dim() == 2 else input_ids.reshape(1, -1)
    if ids.numel() == 0 or ids.is_floating_point():
        raise InputError("input_ids must be a non-empty (batch, tokens) tensor of token ids")
    return ids.long().cpu()


def hidden(
    model: Model, ids: torch.Tensor, start: int, keep: int, tick: Callable[[], None] | None = None
) -> torch.Tensor:
    """The last layer's output for `ids` from absolute position `start` (before the final norm and head);
    `tick()` after each block."""
    step, h = model.step(start, ids.shape[1], keep), model.embed(ids)
    for j in range(model.ckpt.num_layers):
        h = model.block(j, h, step)
        if tick is not None:
            tick()
    return h


def forward(model: Model, ids: torch.Tensor, start: int, keep: int) -> torch.Tensor:
    return torch.cat([chunk for _, chunk in model.logits(hidden(model, ids, start, keep))], dim=1)


@torch.inference_mode()
def forward_logits(
    ckpt: Checkpoint, input_ids: torch.Tensor, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Logits of one full forward pass without cache, (batch, tokens, vocab)."""
    with opened(ckpt, device, dtype, Meter()) as model:
        return forward(model, as_batch(input_ids), 0, 0)


@torch.inference_mode()
def cached_logits(
    ckpt: Checkpoint,
    input_ids: torch.Tensor,
    prefill: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Prefill `prefill` tokens, then feed the others one at a time through the K/V cache (teacher-forced):
    every position's logits, as transformers' cached decoding gives them."""
    ids = as_batch(input_ids)
    with opened(ckpt, device, dtype, Meter()) as model:
        pieces = [forward(model, ids[:, :prefill], 0, prefill)]
        pieces += [forward(model, ids[:, t : t + 1], t, t + 1) for t in range(prefill, ids.shape[1])]
        return torch.cat(pieces, dim=1)
