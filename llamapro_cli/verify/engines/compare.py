"""Comparing what an engine gave for the base and the expanded model, and the engine's base with
transformers' base.

Logits (MLX, llama.cpp) go through `numerics.compare_outputs` unchanged: full forward, prefill + cached
one-token steps, greedy tokens, exactly as the transformers engine. vLLM gives log-probabilities only:
its "full" rows are the prompt log-probabilities of positions 0..T-2 (row i predicts token i+1) and its
"cached" rows those of the greedy tokens generated through its KV cache, so positions and wording differ.

The transformers comparison is informational: the engine's base full pass against transformers' (as
log-probabilities when the engine gives those) within a tolerance that scales with the dtype's rounding
and the logits' size. It shows an engine that runs a different model than transformers (a missing
sliding window) on base and expanded alike, which base vs expanded inside the engine cannot see.
Must not: import torch at module level; run an engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from llamapro_cli.verify.numerics import NumericalResult, Outputs, compare_outputs, row_max_abs

if TYPE_CHECKING:
    from llamapro_cli.verify.engines.protocol import EngineArrays

# Relative tolerance of the transformers comparison, times max(1, largest |logit|): the rounding of
# the dtype accumulated over a few dozen layers in two different kernels.
RELATIVE_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}


def engine_result(base: EngineArrays, expanded: EngineArrays, atol: float) -> NumericalResult:
    """Base vs expanded inside one engine."""
    if base.kind != expanded.kind:
        what = f"the engine gave {base.kind} for the base and {expanded.kind} for the expanded model"
        return NumericalResult(None, None, False, None, None, what, problem=what)
    numbers = compare_outputs(_outputs(base), _outputs(expanded), atol)
    if base.kind == "logits" or numbers.divergence is None or numbers.full_max_abs is None:
        return numbers
    return _logprob_wording(numbers, base, expanded, atol)


def _outputs(arrays: EngineArrays) -> Outputs:
    import torch

    return Outputs(
        torch.from_numpy(arrays.full).unsqueeze(0),
        torch.from_numpy(arrays.cached).unsqueeze(0),
        torch.from_numpy(arrays.greedy).unsqueeze(0),
    )


def _logprob_wording(
    numbers: NumericalResult, base: EngineArrays, expanded: EngineArrays, atol: float
) -> NumericalResult:
    """The divergence of log-probability outputs, in positions of the sequence."""
    from dataclasses import replace

    import torch

    rows_full = row_max_abs(torch.from_numpy(base.full)[None], torch.from_numpy(expanded.full)[None])
    rows_gen = row_max_abs(torch.from_numpy(base.cached)[None], torch.from_numpy(expanded.cached)[None])
    above_full, above_gen = (rows_full > atol).nonzero(), (rows_gen > atol).nonzero()
    prompt_rows = base.full.shape[0]
    if above_full.numel():
        position = int(above_full[0, 0])
        what = (
            f"prompt log-probabilities differ from position {position} "
            f"(max |Δ logprob| {numbers.full_max_abs:.6g})"
        )
    elif above_gen.numel():
        step = int(above_gen[0, 0])
        position = prompt_rows + step
        what = (
            f"log-probabilities of generated token {step} differ (max |Δ logprob| "
            f"{numbers.cached_max_abs:.6g}) while the prompt's match"
        )
    else:
        step = int((torch.from_numpy(base.greedy) != torch.from_numpy(expanded.greedy)).nonzero()[0, 0])
        position, what = prompt_rows + step, f"greedy token {step} after the sequence differs"
    return replace(numbers, position=position, divergence=what)


@dataclass(frozen=True)
class Agreement:
    """The engine's base against transformers' base."""

    max_abs: float | None  # None: the outputs could not be compared
    tolerance: float
    greedy_equal: bool
    note: str


def against_transformers(
    engine_base: EngineArrays, hf: Outputs, dtype: str, engine: str, cause: str | None = None
) -> Agreement:
    """Engine base vs transformers base on the full pass (informational)."""
    import torch

    reference = hf.full[0].double()
    if engine_base.kind == "logprobs":
        reference = torch.log_softmax(reference, dim=-1)[: engine_base.full.shape[0]]
    got = torch.from_numpy(engine_base.full).double()
    if got.shape != reference.shape:
        note = f"not compared: {engine} gave {tuple(got.shape)}, transformers {tuple(reference.shape)}"
        return Agreement(None, 0.0, False, note)
    delta = float(row_max_abs(reference[None], got[None]).max()) if got.numel() else 0.0
    scale = max(1.0, float(reference.abs().max())) if reference.numel() else 1.0
    tolerance = RELATIVE_TOLERANCE.get(dtype, 1e-2) * scale
    greedy_equal = torch.equal(hf.greedy[0], torch.from_numpy(engine_base.greedy))
    what = "log-probabilities" if engine_base.kind == "logprobs" else "logits"
    if delta <= tolerance:
        note = f"{engine}'s base agrees with transformers' base: max |Δ {what}| {delta:.3g} ≤ {tolerance:.3g}"
    else:
        note = (
            f"{engine}'s base differs from transformers' base: max |Δ {what}| {delta:.3g} > {tolerance:.3g} "
            "(the engine runs a different model than transformers, on base and expanded alike"
            + (f"; known: {cause})" if cause else ")")
        )
    return Agreement(delta, tolerance, greedy_equal, note)
