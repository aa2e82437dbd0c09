"""`ServingReport`: what `verify-identity --engine vllm|llama.cpp|mlx` adds to the `IdentityReport`.

Invariant: informational only: nothing here changes the verdict, which comes from base vs expanded
inside the engine (`IdentityReport.full_max_abs` and the rest).
Must not: import torch or an engine.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServingReport:
    """The engine's side of a check: which engine, what it gave, and how its base compares with
    transformers' base."""

    engine: str  # "vllm", "llama.cpp" or "mlx"
    versions: dict[str, str]  # the engine's own distributions and versions
    python: str  # the interpreter it ran in
    outputs: str  # "logits", or "logprobs" (vLLM gives log-probabilities only)
    model_format: str  # "safetensors folder", or the GGUF conversion ("GGUF f32 by convert_hf_to_gguf.py …")
    known_difference: str | None  # what is known to make this engine differ here (None: nothing known)
    hint: str | None  # what to do about that known difference
    transformers_max_abs: float | None  # engine base vs transformers base, full pass (None: not compared)
    transformers_tolerance: float | None
    transformers_greedy_equal: bool | None
    transformers_note: str  # one line: agrees / runs a different model / why not compared
    pattern_fix_max_abs: float | None = None  # llama.cpp: base vs the expanded GGUF with `gguf-pattern`
    pattern_fix_note: str | None = None  # llama.cpp: what the sliding-pattern fix wrote and found
