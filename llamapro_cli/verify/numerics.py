"""The numerical half of `verify-identity`: run base and expanded on the same tokens and compare.

Three passes per model, each of which catches something the others miss: a full forward (no cache), the
same tokens as a prefill plus one-token cached steps (catches cache-layer mismatches that leave full
logits intact), and greedy decoding past the end of the sequence. `compare_hf` runs them through the real
transformers modelling code, one model in memory at a time: the base's outputs are kept on the CPU, the
base freed, then the expanded model loaded. `run_native` adapts `reference.run_lockstep`.

Invariant: exact comparison unless `atol` > 0; NaN equals NaN only where both sides have it, and a value
non-finite on one side only counts as the largest float (so the JSON stays valid).
Must not: import torch or transformers at module level; print (transformers' own logging is silenced
while loading, then restored).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamapro_cli.errors import InputError

if TYPE_CHECKING:
    import torch

    from llamapro_cli.checkpoint import Checkpoint
    from llamapro_cli.plan import ExpansionPlan

ROWS_PER_CHUNK = 64  # logits rows compared at a time (in float64), to bound memory on large vocabularies


@dataclass(frozen=True)
class Inputs:
    """The token ids (1, tokens) on the CPU; the last `decode_steps` are fed one at a time."""

    ids: torch.Tensor
    kind: str  # "random token ids" or "prompt"
    prefill: int
    decode_steps: int


@dataclass(frozen=True)
class Numbers:
    """One engine's comparison of the base's and the expanded model's outputs."""

    full_max_abs: float | None
    cached_max_abs: float | None
    tokens_equal: bool
    layer: int | None  # first diverging expanded layer (native engine)
    position: int | None  # first diverging token position
    divergence: str | None  # what differs first, one line
    peak_bytes_loaded: int | None = None
    problem: str | None = None  # the expanded model cannot even be run cleanly

    def identical(self, atol: float) -> bool:
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


def run_native(
    base: Checkpoint,
    expanded: Checkpoint,
    plan: ExpansionPlan,
    inputs: Inputs,
    device: str,
    dtype: torch.dtype,
    atol: float,
) -> Numbers:
    """The native engine: base and expanded layer by layer in lockstep (`reference.py`)."""
    from llamapro_cli.verify.lockstep import run_lockstep

    result = run_lockstep(
        base,
        expanded,
        plan,
        inputs.ids,
        device=device,
        dtype=dtype,
        prefill=inputs.prefill,
        decode_steps=inputs.decode_steps,
        atol=atol,
    )
    layer, position = result.first_divergence or (None, None)
    return Numbers(
        full_max_abs=result.full_max_abs,
        cached_max_abs=result.cached_max_abs,
        tokens_equal=result.tokens_equal,
        layer=layer,
        position=position,
        divergence=result.divergence_kind,
        peak_bytes_loaded=result.peak_bytes_loaded,
    )


def compare_hf(
    base_root: Path, expanded_root: Path, inputs: Inputs, device: str, dtype: torch.dtype, atol: float
) -> Numbers:
    """The transformers engine: the base's outputs, then the expanded model's, compared."""
    try:
        reference, problems = hf_outputs(base_root, inputs, device, dtype)
    except _LoadFailed as e:
        raise InputError(
            f"transformers cannot load the base {base_root}: {e}",
            hint="the numerical check needs a transformers version that supports it; try --engine native",
        ) from None
    if problems:
        raise InputError(
            f"transformers does not load the base {base_root} cleanly ({problems[0]})",
            hint="the base itself is incomplete; verify against a complete checkpoint",
        )
    try:
        got, problems = hf_outputs(expanded_root, inputs, device, dtype)
    except _LoadFailed as e:
        problem = f"transformers cannot load the expanded checkpoint: {e}"
        return Numbers(None, None, False, None, None, problem, problem=problem)
    numbers = compare_outputs(reference, got, atol)
    if problems:
        problem = f"loading the expanded checkpoint: {problems[0]}" + (
            f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        )
        return replace(numbers, problem=problem, divergence=problem)
    return numbers


class _LoadFailed(Exception):
    pass


def hf_outputs(root: Path, inputs: Inputs, device: str, dtype: torch.dtype) -> tuple[Outputs, list[str]]:
    """Load one model, run the three passes, free the model; loading problems are returned, not raised."""
    import torch

    model, problems = _hf_load(root, device, dtype)
    try:
        ids = inputs.ids.to(device)
        with torch.inference_mode(), quiet_transformers():  # e.g. "kernel not installed" notes
            full = model(input_ids=ids, use_cache=False).logits
            cached = _cached(model, ids, inputs.prefill)
            greedy = _greedy(model, ids, inputs.decode_steps)
        return Outputs(full.cpu(), cached.cpu(), greedy.cpu()), problems
    finally:
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def _hf_load(root: Path, device: str, dtype: torch.dtype) -> tuple[Any, list[str]]:
    import transformers

    # transformers >= 4.56 calls it `dtype`; older versions only know `torch_dtype`.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    kwargs: dict[str, Any] = {"output_loading_info": True, "attn_implementation": "eager", dtype_key: dtype}
    try:
        with quiet_transformers():  # we report loading problems ourselves
            loaded: Any = _model_class(transformers, root).from_pretrained(root, **kwargs)
    except Exception as e:  # transformers raises many types (config validation, shapes, OS errors)
        raise _LoadFailed(_first_line(e)) from e
    model, info = loaded
    labels = {
        "missing_keys": "missing key",
        "unexpected_keys": "unexpected key",
        "mismatched_keys": "mismatched key",
        "error_msgs": "error",
    }
    problems = [
        f"{label} {item}" for key, label in labels.items() for item in sorted(map(str, info.get(key) or ()))
    ]
    return _text_path(model.to(device).eval()), problems


def _model_class(transformers: Any, root: Path) -> Any:
    """The multimodal class config.json names, else AutoModelForCausalLM: Auto maps gemma3 to its
    ForConditionalGeneration class but llama4 to the text-only one, which cannot load the full weights."""
    try:
        names = json.loads((root / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        names = []
    name = str(names[0]) if names else ""
    if name.endswith("ForConditionalGeneration") and hasattr(transformers, name):
        return getattr(transformers, name)
    return transformers.AutoModelForCausalLM


# transformers 5.24's Llama4ForConditionalGeneration.forward reads `outputs.image_outputs`, which its text
# model's output lacks, so every call raises. Without pixel_values its forward is its language_model on
# the same embeddings, so we run that (the weights were still loaded, and checked, as the whole model).
_BROKEN_FORWARD = ("Llama4ForConditionalGeneration",)


def _text_path(model: Any) -> Any:
    return model.language_model if type(model).__name__ in _BROKEN_FORWARD else model


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings and progress bars off, then restored (the library must not print)."""
    from transformers.utils import logging

    hf_logging: Any = logging  # its functions are untyped
    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _cache_kwarg(model: Any) -> str:
    # transformers 5.24 renamed `past_key_values` to `cache` (argument and output); accept both.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cached(model: Any, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    import torch

    name = _cache_kwarg(model)
    out = model(input_ids=ids[:, :prefill], use_cache=True)
    pieces = [out.logits]
    for t in range(prefill, ids.shape[1]):
        out = model(input_ids=ids[:, t : t + 1], use_cache=True, **{name: getattr(out, name)})
        pieces.append(out.logits)
    return torch.cat(pieces, dim=1)


def _greedy(model: Any, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` greedy tokens after the whole sequence, through the cache (EOS does not stop it)."""
    import torch

    name = _cache_kwarg(model)
    out = model(input_ids=ids, use_cache=True)
    tokens: list[torch.Tensor] = []
    for step in range(steps):
        token = out.logits[:, -1:].argmax(dim=-1)
        tokens.append(token)
        if step + 1 < steps:
            out = model(input_ids=token, use_cache=True, **{name: getattr(out, name)})
    return torch.cat(tokens, dim=1) if tokens else ids[:, :0]


def compare_outputs(reference: Outputs, got: Outputs, atol: float) -> Numbers:
    """Max |Δ| of both logit passes, greedy equality, and the first position that differs."""
    import torch

    if reference.full.shape != got.full.shape or reference.cached.shape != got.cached.shape:
        shapes = f"{tuple(got.full.shape)} here, {tuple(reference.full.shape)} in the base"
        return Numbers(None, None, False, None, None, f"logits have shape {shapes}")
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
    return Numbers(full, cached, tokens_equal, None, min(candidates, default=None), divergence)


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
