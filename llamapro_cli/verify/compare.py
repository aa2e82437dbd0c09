"""`compare_checkpoints()`: how far apart two checkpoints are on the same tokens (`llamapro compare A B`).

For any two checkpoints with the same vocabulary (a base and its trained, relayered or pruned version,
two fine-tunes), both models run on the same token ids (`compare_inputs`) with one engine
(`compare_engines`: transformers, or the native streaming engine), and the logits are reduced in float64
as they arrive (`compare_metrics`): max and mean |Δ logit|, mean KL(A‖B), top-1 agreement and each model's
perplexity. It measures and does not judge: the report is a `CompareReport`, and `max_kl` only fills
`within_max_kl`, which the CLI turns into exit 1.

Invariant: options are checked before any checkpoint is read (`UsageError`); two vocabularies that differ,
tokenizers that disagree on the text, a family an engine cannot run, a model transformers does not load
cleanly are `InputError`s (exit 3), never figures. Nothing from a checkpoint runs: no remote code, no
pickle (the same loading code as verify-identity).
Must not: print or choose exit codes; import torch or transformers at module level.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.errors import InputError, UsageError
from llamapro_cli.verify.compare_inputs import (
    DEFAULT_MAX_TOKENS,
    MAX_TOKENS_LIMIT,
    RANDOM,
    Tokens,
    make_tokens,
)
from llamapro_cli.verify.compare_metrics import Metrics
from llamapro_cli.verify.inputs import vocab_size
from llamapro_cli.verify.options import Device, DType, Engine, choice
from llamapro_cli.verify.progress import RunProgress
from llamapro_cli.verify.runtime import (
    auto_dtype,
    peak_gpu_bytes,
    peak_rss_bytes,
    pick_device,
    pick_engine,
)

__all__ = ["CompareEngine", "CompareReport", "compare_checkpoints"]


class CompareEngine(StrEnum):
    AUTO = "auto"  # transformers when installed, else native
    TRANSFORMERS = "transformers"
    NATIVE = "native"


@dataclass(frozen=True)
class CompareReport:
    """What `compare` measured. `--json` prints exactly this (plus schema_version)."""

    a: str
    b: str
    architecture_a: str
    architecture_b: str
    num_layers_a: int
    num_layers_b: int
    vocab_size: int
    engine: str
    device: str
    dtype: str
    input: str  # "random token ids", "prompt" or "text"
    text: str | None  # the --text file
    seed: int | None  # None unless the ids are random
    tokens: int  # tokens fed to both models
    chunks: int  # forward passes the tokens were cut into (each starts at position 0)
    chunk_tokens: int  # tokens in the longest chunk
    predicted_tokens: int  # next-token predictions behind the cross-entropies (tokens - chunks)
    max_abs_logit_diff: float | None  # over every position and vocabulary entry
    mean_abs_logit_diff: float | None
    mean_kl: float | None  # mean over positions of KL(A‖B), nats
    top1_agreement: float | None  # fraction of positions whose argmax agree
    cross_entropy_a: float | None  # mean next-token cross-entropy, nats
    cross_entropy_b: float | None
    perplexity_a: float | None  # exp(cross_entropy_a)
    perplexity_b: float | None
    max_kl: float | None  # the --max-kl limit, None when not given
    within_max_kl: bool | None  # mean_kl <= max_kl (None without --max-kl)
    peak_bytes_loaded: int | None  # native engine: most weight bytes resident at once
    warnings: tuple[str, ...]
    seconds: float
    peak_rss_bytes: int
    peak_gpu_bytes: int | None


@dataclass(frozen=True)
class Run:
    """How the two models run: engine, device, dtype."""

    engine: Engine
    device: str
    dtype: str


def compare_checkpoints(
    a: str | Path | Checkpoint,
    b: str | Path | Checkpoint,
    *,
    text: str | Path | None = None,
    prompt: str | None = None,
    tokens: int | None = None,
    seed: int = 0,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    engine: CompareEngine | str = CompareEngine.AUTO,
    device: Device | str = Device.AUTO,
    dtype: DType | str = DType.AUTO,
    max_kl: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CompareReport:
    """Run A and B on the same tokens and measure how far apart their next-token distributions are.

    One of `text` (a UTF-8 file), `prompt` or `tokens` (seeded random ids) chooses the tokens; by default
    verify-identity's default sequence. `progress(done, total)` follows the run in bytes of weights
    processed."""
    started = time.monotonic()
    # Before the first matrix product: MKL rounds by memory alignment unless strict (verify/identity.py),
    # and identical weights must give identical logits.
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    choices = (
        choice(CompareEngine, engine, "--engine"),
        choice(Device, device, "--device"),
        choice(DType, dtype, "--dtype"),
    )
    _check_options(text=text, prompt=prompt, tokens=tokens, max_tokens=max_tokens, max_kl=max_kl)
    ckpt_a = a if isinstance(a, Checkpoint) else Checkpoint.open(a)
    ckpt_b = b if isinstance(b, Checkpoint) else Checkpoint.open(b)
    vocab = _same_vocabulary(ckpt_a, ckpt_b)
    warnings: list[str] = []
    run = _run(ckpt_a, ckpt_b, *choices, warnings)
    path = None if text is None else Path(text)
    ids = make_tokens(
        ckpt_a, ckpt_b, text=path, prompt=prompt, tokens=tokens, seed=seed, max_tokens=max_tokens,
        warnings=warnings,
    )  # fmt: skip
    metrics, peak_loaded = _measure(ckpt_a, ckpt_b, ids, run, progress)
    for label, count in (("A", metrics.nonfinite_a), ("B", metrics.nonfinite_b)):
        if count:
            warnings.append(
                f"{label} gave {count} logits that are Inf or NaN (a figure they make non-finite is null)"
            )
    within = None if max_kl is None else metrics.mean_kl is not None and metrics.mean_kl <= max_kl
    return CompareReport(
        a=ckpt_a.repo_id or str(ckpt_a.root),
        b=ckpt_b.repo_id or str(ckpt_b.root),
        architecture_a=ckpt_a.family.name,
        architecture_b=ckpt_b.family.name,
        num_layers_a=ckpt_a.num_layers,
        num_layers_b=ckpt_b.num_layers,
        vocab_size=vocab,
        engine=run.engine.value,
        device=run.device,
        dtype=run.dtype,
        input=ids.kind,
        text=None if path is None else str(path),
        seed=seed if ids.kind == RANDOM else None,
        tokens=int(ids.ids.shape[1]),
        chunks=len(ids.chunks),
        chunk_tokens=ids.chunk_tokens,
        predicted_tokens=metrics.predicted,
        max_abs_logit_diff=metrics.max_abs_logit_diff,
        mean_abs_logit_diff=metrics.mean_abs_logit_diff,
        mean_kl=metrics.mean_kl,
        top1_agreement=metrics.top1_agreement,
        cross_entropy_a=metrics.cross_entropy_a,
        cross_entropy_b=metrics.cross_entropy_b,
        perplexity_a=metrics.perplexity_a,
        perplexity_b=metrics.perplexity_b,
        max_kl=max_kl,
        within_max_kl=within,
        peak_bytes_loaded=peak_loaded,
        warnings=tuple(warnings),
        seconds=round(time.monotonic() - started, 3),
        peak_rss_bytes=peak_rss_bytes(),
        peak_gpu_bytes=peak_gpu_bytes(run.device),
    )


def _check_options(
    *, text: str | Path | None, prompt: str | None, tokens: int | None, max_tokens: int, max_kl: float | None
) -> None:
    given = [
        name
        for name, value in (("--text", text), ("--prompt", prompt), ("--tokens", tokens))
        if value is not None
    ]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} exclude each other", hint="give one of them")
    if tokens is not None and tokens < 2:
        raise UsageError(f"--tokens must be at least 2 (one token predicts nothing), got {tokens}")
    if not 2 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise UsageError(f"--max-tokens must be between 2 and {MAX_TOKENS_LIMIT}, got {max_tokens}")
    if max_kl is not None and not (max_kl >= 0 and math.isfinite(max_kl)):  # also refuses NaN
        raise UsageError(f"--max-kl must be zero or a positive number, got {max_kl}")


def _same_vocabulary(a: Checkpoint, b: Checkpoint) -> int:
    va, vb = vocab_size(a), vocab_size(b)
    if va != vb:
        raise InputError(
            f"{a.root} has a vocabulary of {va} tokens and {b.root} one of {vb}: compare needs the same "
            "vocabulary",
            hint="logits over different vocabularies cannot be compared position by position",
        )
    return va


def _run(
    a: Checkpoint, b: Checkpoint, engine: CompareEngine, device: Device, dtype: DType, warnings: list[str]
) -> Run:
    """The engine (refused when it cannot run either checkpoint, or would need their code), device, dtype."""
    run_engine = pick_engine(Engine(engine.value), a, b)
    if run_engine is Engine.TRANSFORMERS:
        from llamapro_cli.verify.hf_engine import refuse_remote_code

        for ckpt in (a, b):
            refuse_remote_code(ckpt, model=True, tokenizer=False)
    return Run(run_engine, pick_device(device), _dtype(a, b, dtype, warnings))


def _dtype(a: Checkpoint, b: Checkpoint, chosen: DType, warnings: list[str]) -> str:
    """`--dtype`, else the checkpoints' own when they agree, else float32 (which holds either exactly)."""
    if chosen is not DType.AUTO:
        return chosen.value
    da, db = auto_dtype(a), auto_dtype(b)
    if da == db:
        return da
    warnings.append(f"A is {da} and B is {db}: both run in float32 (pass --dtype to choose)")
    return "float32"


def _measure(
    a: Checkpoint, b: Checkpoint, ids: Tokens, run: Run, progress: Callable[[int, int], None] | None
) -> tuple[Metrics, int | None]:
    """The figures of A's and B's logits on `ids`, and (native engine) the most weight bytes resident."""
    import torch

    from llamapro_cli.verify.compare_engines import hf_pieces, native_pieces, phases
    from llamapro_cli.verify.compare_metrics import LogitStats
    from llamapro_cli.verify.model import Meter

    chunks = ids.chunks
    steps = RunProgress(progress, phases(run.engine.value, a, b, len(chunks)))
    meter = Meter() if run.engine is Engine.NATIVE else None
    if run.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dtype = getattr(torch, run.dtype)
    pieces = (
        native_pieces(a, b, chunks, run.device, dtype, meter, steps)
        if meter is not None
        else hf_pieces(a, b, chunks, run.device, dtype, steps)
    )
    stats = LogitStats()
    with steps.alive(), torch.inference_mode():  # loading a model inside transformers reports nothing
        for k, start, rows_a, rows_b in pieces:
            # the token after each position of the piece; the chunk's last position has none (-1)
            following = chunks[k][0, start + 1 : start + 1 + rows_a.shape[1]]
            targets = torch.full((rows_a.shape[1],), -1, dtype=torch.long)
            targets[: following.numel()] = following
            stats.add(rows_a, rows_b, targets)
    return stats.metrics(), None if meter is None else meter.peak
