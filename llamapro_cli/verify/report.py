"""`IdentityReport`: what `verify-identity` found, as the library returns it and `--json` prints it.

The numerical fields are flat (the JSON document is `asdict(report)`, unchanged since schema 1) and are
filled from the one `NumericalResult` both engines return; the structural check is nested as its own
`StructuralResult`. What to do about a failure (`hint`) is decided here, next to the verdict, so every
front end says the same.

Invariant: `verdict` is IDENTICAL only when every check that ran found no difference.
Must not: import torch; print; choose exit codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from llamapro_cli.verify.engines.result import ServingReport
from llamapro_cli.verify.structural import StructuralResult

HINT_STRUCTURAL = "re-create it with llamapro expand, or pass the right base with --in"
HINT_NUMERICAL = "the weights and config match but the outputs do not: please report this with --json"


class Verdict(StrEnum):
    IDENTICAL = "identical"
    DIFFERENT = "different"


@dataclass(frozen=True)
class IdentityReport:
    """What `verify-identity` found. `--json` prints exactly this (plus schema_version)."""

    verdict: Verdict
    reason: str | None  # one line: the first difference, when there is one
    expanded: str
    base: str
    architecture: str
    num_layers_in: int
    num_layers_out: int
    new_layers: tuple[int, ...]
    mapping: str  # how the layer mapping was found: "llamapro.json" or "inferred from ..."
    structural: StructuralResult | None  # None when skipped
    engine: str | None  # None when the numerical check did not run
    device: str | None
    dtype: str | None
    input: str | None  # "random token ids" or "prompt"
    seed: int | None
    tokens: int | None  # sequence length of the full forward
    prefill: int | None  # tokens prefilled before the cached one-token steps
    decode_steps: int | None  # cached one-token steps, and greedy tokens generated after the sequence
    atol: float
    full_max_abs: float | None  # max |Δ logit|, full forward
    cached_max_abs: float | None  # max |Δ logit|, prefill + cached steps
    greedy_tokens_equal: bool | None
    first_divergence_layer: int | None  # expanded layer index (native engine only)
    first_divergence_position: int | None  # token position
    divergence: str | None
    peak_bytes_loaded: int | None  # native engine: most weight bytes resident at once
    warnings: tuple[str, ...]
    seconds: float
    peak_rss_bytes: int
    peak_gpu_bytes: int | None
    serving: ServingReport | None = None  # --engine vllm|llama.cpp|mlx: the engine's versions and notes

    @property
    def structure_differs(self) -> bool:
        """The structural check ran and found a difference (then the numerical check did not run)."""
        return self.structural is not None and not self.structural.ok

    @property
    def hint(self) -> str | None:
        """What to do about a DIFFERENT verdict (None when identical)."""
        if self.verdict == Verdict.IDENTICAL:
            return None
        if self.serving is not None and self.serving.hint is not None:
            return self.serving.hint  # a known difference of a serving engine, and what to do about it
        return HINT_STRUCTURAL if self.structure_differs else HINT_NUMERICAL
