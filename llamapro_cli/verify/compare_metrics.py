"""The numbers `compare` reports, accumulated in float64 over logits that arrive a few rows at a time.

`LogitStats.add(a, b, targets)` takes two models' logits for the same positions and the token that
follows each position. Per position t, with V vocabulary entries, log p = log_softmax(a_t) and
log q = log_softmax(b_t), both in float64:
- |Δ logit| = |a_t[v] - b_t[v]| for every v: its maximum and its sum (the mean divides by positions × V);
- KL(A‖B) at t = Σ_v p[v] (log p[v] - log q[v]), terms with p[v] = 0 counting 0, and a sum that rounding
  takes below 0 (around 1e-17) counting 0;
- top-1 agreement: argmax a_t == argmax b_t;
- each model's next-token cross-entropy -log p[target_t] where position t has a following token (the
  last position of a chunk has none); perplexity is exp of the mean.
Rows are converted ROWS at a time, on the device B's logits are on (a GPU computes its own figures), so
memory is a few rows × V × 8 bytes however long the input.

Invariant: identical logits give exactly 0 for |Δ| and KL, full top-1 agreement and equal cross-entropies
(both sides go through the same float64 operations). A figure that is not finite (a model produced Inf
or NaN logits) is reported as None, never as a number JSON cannot carry; `nonfinite_a/b` count them.
Must not: import torch at module level; run a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llamapro_cli.errors import InputError

if TYPE_CHECKING:
    import torch

ROWS = 64  # logit rows converted to float64 at a time (64 x 128K vocabulary x 8 bytes = 64 MiB per model)


@dataclass(frozen=True)
class Metrics:
    """What the logits of two models on the same tokens say; None where a figure is not finite."""

    positions: int  # positions compared (every token of every chunk)
    predicted: int  # positions with a following token (the cross-entropy's count)
    max_abs_logit_diff: float | None
    mean_abs_logit_diff: float | None
    mean_kl: float | None  # mean over positions of KL(A‖B), nats
    top1_agreement: float | None  # fraction of positions whose argmax agree
    cross_entropy_a: float | None  # mean next-token cross-entropy, nats (None: nothing predicted)
    cross_entropy_b: float | None
    perplexity_a: float | None  # exp(cross_entropy_a)
    perplexity_b: float | None
    nonfinite_a: int  # logits that are Inf or NaN
    nonfinite_b: int


class LogitStats:
    """Running sums over every piece of logits `add`ed; `metrics()` turns them into `Metrics`."""

    def __init__(self) -> None:
        import torch

        self.vocab: int | None = None
        self.positions = self.predicted = self.agree = 0
        self.nonfinite_a = self.nonfinite_b = 0
        zero = torch.zeros((), dtype=torch.float64)
        # torch scalars, so a NaN is carried through max and sums instead of being dropped by Python's max
        self.max_abs, self.sum_abs, self.sum_kl = zero, zero.clone(), zero.clone()
        self.nll_a, self.nll_b = zero.clone(), zero.clone()

    def add(self, a: torch.Tensor, b: torch.Tensor, targets: torch.Tensor) -> None:
        """`a`, `b`: (1, n, V) logits of the same n positions; `targets`: (n,) the token after each
        position, -1 where there is none."""
        if a.shape != b.shape:
            raise InputError(
                f"the two models give logits of different shapes ({tuple(a.shape)} and {tuple(b.shape)}): "
                "their vocabularies differ"
            )
        self.vocab = a.shape[-1]
        rows_a, rows_b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        for start in range(0, rows_a.shape[0], ROWS):
            span = slice(start, start + ROWS)
            self._rows(rows_a[span], rows_b[span], targets[span].cpu())

    def _rows(self, a: torch.Tensor, b: torch.Tensor, targets: torch.Tensor) -> None:
        """One block of rows, in float64 on B's device (a GPU computes its own figures)."""
        import torch

        x, y = a.to(b.device, torch.float64), b.to(torch.float64)
        bad_a, bad_b = _nonfinite(x), _nonfinite(y)
        self.nonfinite_a, self.nonfinite_b = self.nonfinite_a + bad_a, self.nonfinite_b + bad_b
        finite = not (bad_a or bad_b)
        delta = (x - y).abs()
        if not finite:
            delta = torch.where(x == y, 0.0, delta)  # equal infinities differ by 0
        self.max_abs = torch.maximum(self.max_abs, delta.max().cpu())  # NaN propagates
        self.sum_abs += delta.sum().cpu()
        log_p, log_q = torch.log_softmax(x, dim=-1), torch.log_softmax(y, dim=-1)
        p = log_p.exp()
        terms = p * (log_p - log_q)
        if not finite:  # p = 0 where both log-probabilities are -inf: 0, not 0 * NaN
            terms = torch.where(p > 0, terms, 0.0)
        self.sum_kl += terms.sum(dim=-1).clamp_min(0.0).sum().cpu()  # clamp_min keeps a NaN a NaN
        self.agree += int((x.argmax(dim=-1) == y.argmax(dim=-1)).sum())
        self.positions += x.shape[0]
        has_next = targets >= 0
        rows, following = has_next.nonzero().flatten(), targets[has_next]
        self.nll_a -= log_p[rows.to(x.device), following.to(x.device)].sum().cpu()
        self.nll_b -= log_q[rows.to(x.device), following.to(x.device)].sum().cpu()
        self.predicted += int(rows.numel())

    def metrics(self) -> Metrics:
        n, m, vocab = self.positions, self.predicted, self.vocab or 0
        ce_a = _finite(float(self.nll_a) / m) if m else None
        ce_b = _finite(float(self.nll_b) / m) if m else None
        return Metrics(
            positions=n,
            predicted=m,
            max_abs_logit_diff=_finite(float(self.max_abs)) if n else None,
            mean_abs_logit_diff=_finite(float(self.sum_abs) / (n * vocab)) if n and vocab else None,
            mean_kl=_finite(float(self.sum_kl) / n) if n else None,
            top1_agreement=self.agree / n if n else None,
            cross_entropy_a=ce_a,
            cross_entropy_b=ce_b,
            perplexity_a=_exp(ce_a),
            perplexity_b=_exp(ce_b),
            nonfinite_a=self.nonfinite_a,
            nonfinite_b=self.nonfinite_b,
        )


def _nonfinite(rows: torch.Tensor) -> int:
    """How many values are Inf or NaN. A sum of finite logits is finite in float64, so the (slower)
    count runs only when the sum is not."""
    return 0 if bool(rows.sum().isfinite()) else int((~rows.isfinite()).sum())


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _exp(value: float | None) -> float | None:
    if value is None:
        return None
    try:
        return _finite(math.exp(value))
    except OverflowError:  # a cross-entropy above ~709 nats: the perplexity is beyond float64
        return None
