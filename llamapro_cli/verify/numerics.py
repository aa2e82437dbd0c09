"""The numerical result of `verify-identity`, and the comparison of two models' outputs.

Both engines (`hf_engine.compare_hf`, the transformers modelling code; `lockstep.run_native`, the native
streaming engine) return one `NumericalResult`; `IdentityReport` is built from it. Three passes per model,
each of which catches something the others miss: a full forward (no cache), the same tokens as a prefill
plus one-token cached steps (catches cache-layer mismatches that leave full logits intact), and greedy
decoding past the end of the sequence. `compare_outputs` compares two models' `Outputs` of those passes.

Invariant: exact comparison unless `atol` > 0, and "identical" only when the full forward, the cached
decoding and the greedy tokens all agree; NaN equals NaN only where both sides have it, and a value
non-finite on one side only counts as the largest float (so the JSON stays valid).
Must not: import torch or transformers at module level; run a model.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ROWS_PER_CHUNK = 64  # logits rows compared at a time (in float64), to bound memory on large vocabularies


@dataclass(frozen=True)
class Inputs:
    """The token ids (1, tokens) on the CPU; the last `decode_steps` are fed one at a time."""

    ids: torch.Tensor
    kind: str  # "random token ids" or "prompt"
    prefill: int
    decode_steps: int


@dataclass(frozen=True)
class NumericalResult:
    """One engine's comparison of the base's and the expanded model's outputs."""

    full_max_abs: float | None  # max |Δ logit|, full forward (None: the outputs could not be compared)
    cached_max_abs: float | None  # max |Δ logit|, prefill + cached one-token steps
    tokens_equal: bool  # greedy continuations equal
    layer: int | None  # first diverging expanded layer (native engine; -1 embedding, L final norm/head)
    position: int | None  # first diverging token position
    divergence: str | None  # what differs first, one line
    peak_bytes_loaded: int | None = None  # native engine: most checkpoint bytes of weights resident at once
    bytes_loaded: int | None = None  # native engine: checkpoint bytes read in all
    problem: str | None = None  # the expanded model cannot even be run cleanly

    def identical(self, atol: float) -> bool:
        """True only when every pass ran and agreed within `atol`."""
        full, cached = self.full_max_abs, self.cached_max_abs
        return (
            self.problem is None
            and full is not None
            and cached is not None
            and full <= atol
            and cached <= atol
            and self.tokens_equal
        )


@dataclass(frozen=True)
class Outputs:
    full: torch.Tensor  # (1, T, vocab) logits, no cache
    cached: torch.Tensor  # (1, T, vocab) logits, prefill then one-token cached steps
    greedy: torch.Tensor  # (1, decode_steps) token ids generated after the sequence


def compare_outputs(reference: Outputs, got: Outputs, atol: float) -> NumericalResult:
    """Max |Δ| of both logit passes, greedy equality, and the first position that differs."""
    import torch

    if reference.full.shape != got.full.shape or reference.cached.shape != got.cached.shape:
        shapes = f"{tuple(got.full.shape)} here, {tuple(reference.full.shape)} in the base"
        return NumericalResult(None, None, False, None, None, f"logits have shape {shapes}")
    full_rows, cached_rows = row_max_abs(reference.full, got.full), row_max_abs(reference.cached, got.cached)
    full, cached = _max(full_rows), _max(cached_rows)
    tokens_equal = torch.equal(reference.greedy, got.greedy)
    pos_full, pos_cached = _first_above(full_rows, atol), _first_above(cached_rows, atol)
    if pos_full is not None:
        divergence = f"full-forward logits differ from position {pos_full} (max |Δ| {full:.6g})"
    elif pos_cached is not None:
        divergence = (
            f"cached-decoding logits differ from position {pos_cached} (max |Δ| {cached:.6g}) while the "
            "full forward matches: the KV cache behaves differently"
        )
    elif not tokens_equal:
        step = int((reference.greedy != got.greedy).nonzero()[0, 1])
        divergence = f"greedy token {step} after the sequence differs"
        pos_cached = reference.full.shape[1] + step
    else:
        divergence = None
    candidates = [p for p in (pos_full, pos_cached) if p is not None]
    return NumericalResult(full, cached, tokens_equal, None, min(candidates, default=None), divergence)


def row_max_abs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per position (dim 1), the largest |a - b| over batch and vocabulary, in float64."""
    import torch

    rows = []
    for start in range(0, a.shape[1], ROWS_PER_CHUNK):
        x, y = a[:, start : start + ROWS_PER_CHUNK].double(), b[:, start : start + ROWS_PER_CHUNK].double()
        delta = (x - y).abs()
        same = (x == y) | (x.isnan() & y.isnan())  # equal infinities and NaN-vs-NaN count as equal
        delta = torch.nan_to_num(
            delta.masked_fill(same, 0.0), nan=sys.float_info.max, posinf=sys.float_info.max
        )
        rows.append(delta.amax(dim=(0, 2)) if delta.numel() else delta.new_zeros(delta.shape[1]))
    return torch.cat(rows) if rows else a.new_zeros(0, dtype=torch.float64)


def _max(rows: torch.Tensor) -> float:
    return float(rows.max()) if rows.numel() else 0.0


def _first_above(rows: torch.Tensor, atol: float) -> int | None:
    above = (rows > atol).nonzero()
    return int(above[0, 0]) if above.numel() else None
