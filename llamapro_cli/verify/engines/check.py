"""`verify_in_engine`: base and expanded through one serving engine, compared; what `identity` calls for
`--engine vllm|llama.cpp|mlx`.

Steps: find the engine's interpreter; in a temporary folder (kept with LLAMAPRO_DEBUG=1), prepare the
models (llama.cpp: convert both to GGUF with the engine's converter, and where llama.cpp would derive a
different sliding pattern than the config's, also a copy with `gguf-pattern`'s fix); one adapter run
feeds the same ids through every model, one at a time; compare base vs expanded (the verdict), the fixed
pair (llama.cpp), and the engine's base with transformers' base (informational).

Invariant: the verdict is base vs expanded as the engine gets them from the user's files (for llama.cpp:
as the converter writes them); a fix is reported beside it, never instead of it.
Must not: import an engine; print; choose exit codes.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.verify.engines import gguf
from llamapro_cli.verify.engines.compare import against_transformers, engine_result
from llamapro_cli.verify.engines.protocol import (
    BASE,
    EXPANDED,
    EngineArrays,
    Job,
    ProtocolError,
    read_arrays,
    read_versions,
)
from llamapro_cli.verify.engines.result import ServingReport
from llamapro_cli.verify.engines.runner import resolve_python, run_adapter
from llamapro_cli.verify.engines.spec import RECIPES, ServingEngine, known_cause, transformers_cause
from llamapro_cli.verify.numerics import Inputs, NumericalResult

BASE_FIXED, EXPANDED_FIXED = "base-pattern", "expanded-pattern"


def serving_engine(engine: object) -> ServingEngine:
    """`options.Engine.MLX` (or its value) as a `ServingEngine`."""
    return ServingEngine(str(getattr(engine, "value", engine)))


@dataclass(frozen=True)
class Prepared:
    models: tuple[tuple[str, Path], ...]
    model_format: str
    fix_note: str | None  # llama.cpp: what the pattern fix wrote (None: nothing to fix)


def verify_in_engine(
    engine: ServingEngine,
    base: Checkpoint,
    expanded: Checkpoint,
    inputs: Inputs,
    *,
    dtype: str,
    device: str,
    atol: float,
    python: str | Path | None,
    warnings: list[str],
    progress: Callable[[int, int], None] | None = None,
) -> tuple[NumericalResult, ServingReport]:
    interpreter = resolve_python(engine, python)
    ids = [int(x) for x in inputs.ids.reshape(-1).tolist()]
    with _workdir(warnings) as work:
        _step(progress, 0)
        prepared = _prepare(engine, base, expanded, dtype, interpreter, work, warnings)
        _step(progress, 1)
        job = Job(
            engine=engine.value,
            dtype=dtype,
            device=device,
            threads=os.cpu_count() or 1,
            ids=ids,
            prefill=inputs.prefill,
            decode_steps=inputs.decode_steps,
            models=prepared.models,
            options={"max_model_len": len(ids) + inputs.decode_steps + 8},
        )
        separate = RECIPES[engine].process_per_model
        for models in [(m,) for m in prepared.models] if separate else [prepared.models]:
            run_adapter(engine, interpreter, replace(job, models=models), work)
        _step(progress, 2)
        try:
            versions = read_versions(work)
            arrays = {
                name: read_arrays(work, name, tokens=len(ids), decode_steps=inputs.decode_steps)
                for name, _ in prepared.models
            }
        except ProtocolError as e:
            from llamapro_cli.errors import InputError

            raise InputError(f"the {engine.value} adapter gave a malformed answer: {e}") from None
    numbers = engine_result(arrays[BASE], arrays[EXPANDED], atol)
    fix_max, fix_note = _fixed(arrays, prepared, atol)
    hf = _transformers(base, inputs, arrays[BASE], dtype, engine)
    cause = known_cause(engine, expanded.family.name, dtype, prepared.fix_note is not None)
    if numbers.divergence is not None:
        why = f"known: {cause.short}" if cause else f"no known cause in {engine.value}"
        numbers = replace(numbers, divergence=f"{numbers.divergence} ({why})")
    _step(progress, 3)
    report = ServingReport(
        engine=engine.value,
        versions=versions,
        python=str(interpreter),
        outputs=arrays[BASE].kind,
        model_format=prepared.model_format,
        known_difference=cause.detail if cause else None,
        hint=cause.hint if cause else None,
        transformers_max_abs=hf[0],
        transformers_tolerance=hf[1],
        transformers_greedy_equal=hf[2],
        transformers_note=hf[3],
        pattern_fix_max_abs=fix_max,
        pattern_fix_note=fix_note,
    )
    return numbers, report


def _step(progress: Callable[[int, int], None] | None, done: int) -> None:
    if progress is not None:
        progress(done, 3)


@contextmanager
def _workdir(warnings: list[str]) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="llamapro-engine-"))
    keep = bool(os.environ.get("LLAMAPRO_DEBUG"))
    try:
        yield path
    finally:
        if keep:
            warnings.append(f"LLAMAPRO_DEBUG: the exchange folder is kept in {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def _prepare(
    engine: ServingEngine,
    base: Checkpoint,
    expanded: Checkpoint,
    dtype: str,
    python: Path,
    work: Path,
    warnings: list[str],
) -> Prepared:
    if engine is not ServingEngine.LLAMA_CPP:
        folders = ((BASE, base.root), (EXPANDED, expanded.root))
        return Prepared(folders, "safetensors folder (the engine's own loader)", None)
    paths = {
        name: gguf.convert(ckpt, work / f"{name}.gguf", dtype, python, work, warnings)
        for name, ckpt in ((BASE, base), (EXPANDED, expanded))
    }
    converter = gguf.find_converter(python)
    fmt = f"GGUF {gguf.OUTTYPE[dtype]} by {converter.name} of {converter.parent.parent.parent.name}"
    models: list[tuple[str, Path]] = [(BASE, paths[BASE]), (EXPANDED, paths[EXPANDED])]
    infos = dict(zip((BASE, EXPANDED), gguf.inspect_ggufs(python, list(paths.values()), work), strict=True))
    notes, fixed = [], {}
    for name, ckpt in ((BASE, base), (EXPANDED, expanded)):
        wrong = gguf.pattern_mismatch(ckpt, infos[name])
        if wrong is None:
            warnings.append(
                f"llama.cpp's {infos[name].architecture} reads no per-layer sliding pattern: the {name} "
                "model's sliding layers cannot be expressed in its GGUF"
            )
        elif wrong:
            fixed[name] = work / f"{name}-pattern.gguf"
            gguf.patch(python, paths[name], fixed[name], gguf.wanted_pattern(ckpt) or [], work)
            key = f"{infos[name].architecture}.attention.sliding_window_pattern"
            notes.append(f"{name}: llama.cpp slides wrongly on layers {gguf.layers_text(wrong)}; wrote {key}")
    if fixed:
        models.append((BASE_FIXED, fixed.get(BASE, paths[BASE])))
        models.append((EXPANDED_FIXED, fixed.get(EXPANDED, paths[EXPANDED])))
    return Prepared(tuple(models), fmt, "; ".join(notes) if notes else None)


def _fixed(
    arrays: dict[str, EngineArrays], prepared: Prepared, atol: float
) -> tuple[float | None, str | None]:
    """base vs expanded after `gguf-pattern` (llama.cpp, when there was something to fix)."""
    if prepared.fix_note is None:
        return None, None
    numbers = engine_result(arrays[BASE_FIXED], arrays[EXPANDED_FIXED], atol)
    deltas = [d for d in (numbers.full_max_abs, numbers.cached_max_abs) if d is not None]
    worst = max(deltas) if deltas else None
    if numbers.identical(atol):
        verdict = "with `llamapro gguf-pattern` the expanded GGUF is bit-identical to the base"
    else:
        verdict = f"with `llamapro gguf-pattern` they still differ: {numbers.divergence}"
    return worst, f"{prepared.fix_note}. {verdict}"


def _transformers(
    base: Checkpoint, inputs: Inputs, engine_base: EngineArrays, dtype: str, engine: ServingEngine
) -> tuple[float | None, float | None, bool | None, str]:
    """(max |Δ|, tolerance, greedy equal, note) of the engine's base against transformers' base."""
    if importlib.util.find_spec("transformers") is None:
        return None, None, None, "not compared with transformers: it is not installed here"
    import torch

    from llamapro_cli.verify.hf_engine import hf_outputs

    try:
        outputs, problems = hf_outputs(base.root, inputs, "cpu", getattr(torch, dtype))
    except Exception as e:  # informational: whatever transformers raises (it raises many types), go on
        return None, None, None, f"not compared with transformers: it cannot run the base ({e})"
    if problems:
        return None, None, None, f"not compared with transformers: it loads the base with {problems[0]}"
    cause = transformers_cause(engine, base.family.name)
    agreement = against_transformers(engine_base, outputs, dtype, engine.value, cause)
    return agreement.max_abs, agreement.tolerance, agreement.greedy_equal, agreement.note
