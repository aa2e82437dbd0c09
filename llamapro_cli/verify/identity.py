"""`verify_identity()`: does an expanded checkpoint compute exactly what its base computed?

Two independent witnesses, cheapest first. The structural check (`structural.py`: config and bytes, no
torch) proves the identity from the weights and stops at the first mismatch. The numerical check then
runs both models on the same tokens: a full forward, cached decoding (a prefill longer than every active
sliding window, then one-token steps through the KV cache) and greedy decoding, compared exactly (or
within `atol`). Engines:
- `transformers`, the real modelling code: load the base, keep its outputs, free it, load the expanded
  model, compare (peak memory: one model). Loading must be clean: transformers only *warns* about missing
  or unexpected keys and fills the gaps with random weights.
- `native` (`lockstep.run_native`): one block in memory at a time, base and expanded in lockstep, so it
  names the first diverging layer and position and verifies models larger than memory.
Both return one `NumericalResult` (`numerics.py`), from which the `IdentityReport` (`report.py`) is built.

Invariant: the verdict is "identical" only when every check that ran found no difference. The layer
mapping comes from `llamapro.json` (generations composed down to the base asked for), or is inferred
(`lineage.layer_mapping`) and reported as such. What transformers could load only with the checkpoint's
own code is refused before any check runs (`hf_engine.refuse_remote_code`).
Must not: print or choose exit codes (the CLI does); run code from a checkpoint; import torch or
transformers at module level.
"""

from __future__ import annotations

import importlib.util
import os
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.errors import InputError, UnsupportedError, UsageError
from llamapro_cli.io.files import PROVENANCE_NAME
from llamapro_cli.layer_map import identity_problem
from llamapro_cli.lineage import LayerMapping, layer_mapping
from llamapro_cli.plan import ExpansionPlan
from llamapro_cli.verify.engines.result import ServingReport
from llamapro_cli.verify.hf_engine import config_reader
from llamapro_cli.verify.inputs import make_inputs, tokenizer_checkpoint
from llamapro_cli.verify.numerics import Inputs, NumericalResult
from llamapro_cli.verify.options import SERVING_ENGINES, Device, DType, Engine, Options
from llamapro_cli.verify.progress import Phase, RunProgress
from llamapro_cli.verify.report import IdentityReport, Verdict
from llamapro_cli.verify.structural import StructuralResult, check_structure

__all__ = ["DType", "Device", "Engine", "IdentityReport", "Verdict", "auto_dtype", "verify_identity"]

_FLOAT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@dataclass(frozen=True)
class Run:
    """How the numerical check ran."""

    engine: str
    device: str
    dtype: str
    inputs: Inputs
    seed: int | None
    serving: ServingReport | None = None  # --engine vllm|llama.cpp|mlx: the engine's side


def verify_identity(
    expanded: str | Path | Checkpoint,
    *,
    base: str | Path | Checkpoint | None = None,
    engine: Engine | str = Engine.AUTO,
    device: Device | str = Device.AUTO,
    dtype: DType | str = DType.AUTO,
    tokens: int | None = None,
    seed: int = 0,
    prompt: str | None = None,
    atol: float = 0.0,
    decode_steps: int = 8,
    engine_python: str | Path | None = None,
    structural: bool = True,
    numerical: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> IdentityReport:
    """Check that `expanded` computes what `base` (default: the source in its llamapro.json) computes.

    `structural=False` or `numerical=False` skip a check (the report says so); the numerical check
    does not run after a structural mismatch, which already decides the verdict. `progress(done, total)`
    follows every phase on one scale, bytes of weights processed (`progress.py`), and is called at least
    once a second while a model loads.
    """
    started = time.monotonic()
    if not (structural or numerical):
        raise UsageError("nothing to check: structural and numerical are both off")
    opts = Options.parse(
        engine=engine,
        device=device,
        dtype=dtype,
        tokens=tokens,
        seed=seed,
        prompt=prompt,
        atol=atol,
        decode_steps=decode_steps,
        engine_python=None if engine_python is None else str(engine_python),
    )
    exp = expanded if isinstance(expanded, Checkpoint) else Checkpoint.open(expanded)
    src = _open_base(exp, base)
    mapping = layer_mapping(exp, src)
    _check_base(exp, src, mapping.plan)
    warnings = _lineage_warnings(src, mapping)
    if numerical:
        _refuse_checkpoint_code(src, exp, opts)
    steps = RunProgress(progress, _phases(src, exp, opts, structural=structural, numerical=numerical))
    shape = (
        check_structure(
            src, exp, mapping.plan, progress=steps.of(Phase.STRUCTURAL), normalise=config_reader()
        )
        if structural
        else None
    )
    run, numbers = None, None
    if numerical and (shape is None or shape.ok):
        with steps.alive():  # loading a model inside transformers reports nothing for a while
            run, numbers = _numerical(src, exp, mapping.plan, opts, warnings, steps)
    return _report(src, exp, mapping, shape, run, numbers, warnings, opts.atol, started)


def _open_base(exp: Checkpoint, base: str | Path | Checkpoint | None) -> Checkpoint:
    if isinstance(base, Checkpoint):
        return base
    if base is not None:
        return Checkpoint.open(base)
    record = exp.provenance
    if record is None:
        raise InputError(
            f"{exp.root}: no {PROVENANCE_NAME}, so the base checkpoint is unknown",
            hint="pass the checkpoint it was expanded from with --in (the layer mapping is then inferred)",
        )
    path, repo_id = record.source.path, record.source.repo_id
    if path is not None and Path(path).is_dir():
        return Checkpoint.open(path)
    if repo_id is not None:
        return Checkpoint.open(repo_id, revision=record.source.revision)
    raise InputError(
        f"{exp.root / PROVENANCE_NAME}: the base it records ({path}) does not exist any more",
        hint="pass the base checkpoint with --in",
    )


def _check_base(exp: Checkpoint, base: Checkpoint, plan: ExpansionPlan) -> None:
    """A base of another family or depth cannot be compared at all: that is exit 3, not a verdict."""
    if base.family.name != exp.family.name or base.num_layers != plan.num_layers_in:
        raise InputError(
            f"{base.root} is a {base.num_layers}-layer {base.family.name} model, but {exp.root} was "
            f"expanded from a {plan.num_layers_in}-layer {exp.family.name} model",
            hint="is --in the checkpoint this one was expanded from?",
        )
    problem = identity_problem([(x.source, x.identity) for x in plan.layers], plan.num_layers_in)
    if problem:  # a relayer map: no logit has to match, so there is no identity to verify (exit 2)
        raise UsageError(
            f"{exp.root}: its layer map over {base.root} (--layers {plan.spec}) is not an identity map "
            f"({problem}), so it is not meant to compute the same logits",
            hint=f"measure how far apart they are: llamapro compare {base.root} {exp.root}",
        )


def _lineage_warnings(base: Checkpoint, mapping: LayerMapping) -> list[str]:
    warnings = []
    recorded = mapping.source.config_sha256 if mapping.source else None
    if recorded and recorded != base.config_sha256:
        warnings.append(
            f"{base.root / 'config.json'} is not the config.json this checkpoint was expanded from"
        )
    if mapping.source is None:
        pairs = ", ".join(f"{x.index}<-{x.source}" for x in mapping.plan.layers if x.identity)
        warnings.append(f"no {PROVENANCE_NAME}: layer mapping {mapping.how} (new<-source: {pairs})")
    return warnings


def _refuse_checkpoint_code(base: Checkpoint, exp: Checkpoint, opts: Options) -> None:
    """Before any check runs: refuse what transformers could load only with the checkpoint's own code."""
    if importlib.util.find_spec("transformers") is None:
        return  # nothing will be loaded through transformers
    from llamapro_cli.verify.hf_engine import refuse_remote_code

    if _planned_engine(opts.engine) is Engine.TRANSFORMERS:
        for ckpt in (base, exp):
            refuse_remote_code(ckpt, model=True, tokenizer=False)
    source = tokenizer_checkpoint(exp, base) if opts.prompt is not None else None
    if source is not None:
        refuse_remote_code(source, model=False, tokenizer=True)


# --- the numerical check --------------------------------------------------------------------------------


def _phases(
    base: Checkpoint, exp: Checkpoint, opts: Options, *, structural: bool, numerical: bool
) -> list[tuple[Phase, int]]:
    """The phases this run will go through, each sized in bytes of weights processed (`progress.py`)."""
    phases = [(Phase.STRUCTURAL, exp.total_bytes())] if structural else []
    if not numerical:
        return phases
    b, e = base.total_bytes(), exp.total_bytes()
    if _planned_engine(opts.engine) is Engine.NATIVE:  # every block of both, once per pass
        return [*phases, (Phase.LOCKSTEP, (b + e) * (1 + opts.decode_steps))]
    runs = 3  # each model: loaded once, then three passes (full forward, cached decoding, greedy tokens)
    return [
        *phases,
        (Phase.LOAD_BASE, b),
        (Phase.RUN_BASE, runs * b),
        (Phase.LOAD_EXPANDED, e),
        (Phase.RUN_EXPANDED, runs * e),
    ]


def _numerical(
    base: Checkpoint,
    exp: Checkpoint,
    plan: ExpansionPlan,
    opts: Options,
    warnings: list[str],
    progress: RunProgress,
) -> tuple[Run, NumericalResult]:
    # MKL (torch's CPU BLAS) picks kernels by memory alignment, so the same product of the same values
    # can round differently in two models whose tensors sit at different addresses (measured: 7e-7 in
    # one-token decode steps). Strict conditional reproducibility removes that; MKL reads it once, at its
    # first call, so a process that already ran a matrix product keeps its mode (the CLI never has).
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    import torch

    engine = _engine(opts.engine, exp)
    device = _device(opts.device)
    dtype = auto_dtype(exp) if opts.dtype is DType.AUTO else opts.dtype.value
    if engine is Engine.LLAMA_CPP and opts.dtype is DType.AUTO:
        dtype = "float32"  # the GGUF conversion's default: f32 holds every source dtype exactly
    inputs = make_inputs(
        base,
        exp,
        device=device,
        tokens=opts.tokens,
        seed=opts.seed,
        prompt=opts.prompt,
        decode_steps=opts.decode_steps,
        warnings=warnings,
    )
    run = Run(engine.value, device, dtype, inputs, None if opts.prompt is not None else opts.seed)
    if engine in SERVING_ENGINES:
        from llamapro_cli.verify.engines.check import serving_engine, verify_in_engine

        numbers, serving = verify_in_engine(
            serving_engine(engine), base, exp, inputs, dtype=dtype, device=device, atol=opts.atol,
            python=opts.engine_python, warnings=warnings,
        )  # fmt: skip
        return replace(run, serving=serving), numbers
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if engine is Engine.NATIVE:
        from llamapro_cli.verify.lockstep import run_native

        numbers = run_native(
            base, exp, plan, inputs, device, getattr(torch, dtype), opts.atol, progress.of(Phase.LOCKSTEP)
        )
        return run, numbers
    from llamapro_cli.verify.hf_engine import compare_hf

    return run, compare_hf(base.root, exp.root, inputs, device, getattr(torch, dtype), opts.atol, progress)


def _planned_engine(choice: Engine) -> Engine:
    """The engine `auto` stands for here (availability is checked by `_engine`)."""
    if choice is not Engine.AUTO:
        return choice
    return Engine.TRANSFORMERS if importlib.util.find_spec("transformers") is not None else Engine.NATIVE


def _engine(choice: Engine, exp: Checkpoint) -> Engine:
    has_hf = importlib.util.find_spec("transformers") is not None
    choice = _planned_engine(choice)
    if choice is Engine.TRANSFORMERS and not has_hf:
        raise InputError(
            "--engine transformers needs the transformers package",
            hint="pip install 'llamapro-cli[hf]', or use --engine native",
        )
    if choice is Engine.NATIVE:
        from llamapro_cli.verify.spec import SUPPORTED_FAMILIES

        if exp.family.name not in SUPPORTED_FAMILIES:
            raise UnsupportedError(
                f"the native engine does not support {exp.family.name} models",
                hint="use --engine transformers (pip install 'llamapro-cli[hf]')",
            )
    return choice


def _device(choice: Device) -> str:
    import torch

    if choice is Device.AUTO:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice is Device.CUDA and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available here", hint="use --device cpu")
    return choice.value


def auto_dtype(exp: Checkpoint) -> str:
    """The config's dtype when it names one we run, else the dtype holding most parameters."""
    for config in (exp.family.sub_config(exp.config), exp.config):
        for key in ("dtype", "torch_dtype"):
            if config.get(key) in _FLOAT_DTYPES.values():
                return str(config[key])
    counts: Counter[str] = Counter()
    for name in exp.weight_map:
        info = exp.info(name)
        if info.dtype in _FLOAT_DTYPES:
            counts[_FLOAT_DTYPES[info.dtype]] += info.numel
    if not counts:
        raise InputError(f"{exp.root}: no float32/bfloat16/float16 weights to run", hint="pass --dtype")
    return counts.most_common(1)[0][0]


# --- the report -----------------------------------------------------------------------------------------


def _report(
    base: Checkpoint,
    exp: Checkpoint,
    mapping: LayerMapping,
    shape: StructuralResult | None,
    run: Run | None,
    numbers: NumericalResult | None,
    warnings: list[str],
    atol: float,
    started: float,
) -> IdentityReport:
    ok = (shape is None or shape.ok) and (numbers is None or numbers.identical(atol))
    reason = (
        shape.mismatch if shape is not None and not shape.ok else (numbers.divergence if numbers else None)
    )
    inputs = run.inputs if run else None
    return IdentityReport(
        verdict=Verdict.IDENTICAL if ok else Verdict.DIFFERENT,
        reason=None if ok else reason or "outputs differ",
        expanded=exp.repo_id or str(exp.root),
        base=base.repo_id or str(base.root),
        architecture=exp.family.name,
        num_layers_in=mapping.plan.num_layers_in,
        num_layers_out=mapping.plan.num_layers_out,
        new_layers=mapping.plan.new_indices,
        mapping=mapping.how,
        structural=shape,
        engine=run.engine if run else None,
        device=run.device if run else None,
        dtype=run.dtype if run else None,
        input=inputs.kind if inputs else None,
        seed=run.seed if run else None,
        tokens=int(inputs.ids.shape[1]) if inputs else None,
        prefill=inputs.prefill if inputs else None,
        decode_steps=inputs.decode_steps if inputs else None,
        atol=atol,
        full_max_abs=numbers.full_max_abs if numbers else None,
        cached_max_abs=numbers.cached_max_abs if numbers else None,
        greedy_tokens_equal=numbers.tokens_equal if numbers else None,
        first_divergence_layer=numbers.layer if numbers else None,
        first_divergence_position=numbers.position if numbers else None,
        divergence=numbers.divergence if numbers else None,
        peak_bytes_loaded=numbers.peak_bytes_loaded if numbers else None,
        warnings=tuple(warnings),
        seconds=round(time.monotonic() - started, 3),
        peak_rss_bytes=peak_rss_bytes(),
        peak_gpu_bytes=_peak_gpu(run.device if run else None),
        serving=run.serving if run else None,
    )


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


def _peak_gpu(device: str | None) -> int | None:
    if device != "cuda":
        return None
    import torch

    return int(torch.cuda.max_memory_allocated())
