"""The arithmetic of one LoRA merge, written as PEFT writes it so the bytes come out the same.

`merge_into(weight, pair, a, b, magnitude)` updates one base weight in place, exactly as PEFT 0.21's
`LoraModel.merge_and_unload()` does on CPU after `PeftModel.from_pretrained(model, adapter)` with the
model in its stored dtype (transformers 5's default) and PEFT's default `autocast_adapter_dtype=True`:

- the adapter tensors live in float32 (PEFT upcasts bf16/fp16 adapter weights; fp32 ones stay), so
  `A`, `B` and DoRA's magnitude are converted to float32 first;
- `delta = (B @ A) * scaling` in float32 (`Linear.get_delta_weight`; no cast back, the adapter is fp32);
- plain LoRA: `weight += delta` in place (`Linear.merge`, `safe_merge=False`): bf16 + fp32 computed in
  fp32 and rounded once to the weight's dtype;
- DoRA (`DoraLinearVariant.merge_unsafe`): `norm = ||W + 1 * delta||` row-wise (`DoraLinearLayer.
  get_weight_norm`, in fp32), `W' = ((m / norm).view(-1, 1) * (W + delta)).to(W.dtype)`.

Same torch operations in the same order on the same values give the same bits (tests compare with
PEFT's own merge byte for byte, bf16 and fp32, plain, rsLoRA and DoRA). Memory: the weight in its own
dtype plus one float32 tensor of its shape (the elementwise steps run over blocks of rows), DoRA
included.

Invariant: one weight at a time; the caller owns the buffer. Must not: read or write files.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# safetensors dtype -> torch attribute name, for the dtypes a merged weight may have.
WEIGHT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
ADAPTER_DTYPES = {**WEIGHT_DTYPES, "F64": "float64"}
ROW_BLOCK_BYTES = 16 * 1024 * 1024  # float32 bytes per block of rows in the elementwise steps


def as_tensor(buffer: bytearray, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor sharing `buffer` (no copy): writes to it change the buffer."""
    import torch

    if not buffer:
        return torch.empty(shape, dtype=getattr(torch, ADAPTER_DTYPES[dtype]))
    return torch.frombuffer(buffer, dtype=getattr(torch, ADAPTER_DTYPES[dtype])).view(shape)


def merge_into(
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor | None = None,
) -> None:
    """Merge one LoRA pair into `weight` (out, in), in place."""
    import torch

    a32, b32 = a.to(torch.float32), b.to(torch.float32)
    delta = b32 @ a32
    del a32, b32
    delta.mul_(scaling)  # the same elementwise product as PEFT's `(B @ A) * scaling`
    if magnitude is None:
        _in_rows(weight, delta, lambda w, d: w.add_(d))  # computed in fp32, rounded once to weight.dtype
        return
    # PEFT forms W + 1 * delta twice (for the norm, then for the product); IEEE addition commutes and
    # 1 * x is x, so one in-place sum gives both the same values and saves two float32 copies.
    _in_rows(delta, weight, lambda d, w: d.add_(w))
    norm = torch.linalg.norm(delta, dim=1)
    delta.mul_((magnitude.to(torch.float32) / norm).view(-1, 1))
    _in_rows(weight, delta, lambda w, d: w.copy_(d))  # .to(weight.dtype): one rounding


def _in_rows(
    target: torch.Tensor, other: torch.Tensor, op: Callable[[torch.Tensor, torch.Tensor], object]
) -> None:
    """An elementwise in-place op over blocks of rows: the same bits as on the whole tensors (each element
    is computed alone), without the full-size float32 copy torch makes for a mixed-dtype in-place op."""
    if target.numel() == 0:
        return
    rows = max(1, ROW_BLOCK_BYTES // (4 * target[0].numel()))
    for start in range(0, target.shape[0], rows):
        op(target[start : start + rows], other[start : start + rows])


def convert_into(target: torch.Tensor, source: torch.Tensor) -> None:
    """A full tensor saved by the adapter in another dtype, converted as `load_state_dict` copies it."""
    target.copy_(source)
