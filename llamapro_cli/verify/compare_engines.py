"""How `compare` gets the two models' logits for the same chunks of tokens, as a stream of pieces.

A piece is (chunk index, first position, A's logits, B's logits) for a run of positions of one chunk;
`compare_metrics.LogitStats` consumes them and drops them.
- transformers (`hf_pieces`): the real modelling code through `hf_engine.load_model` (eager attention,
  no remote code, loading checked clean). A is loaded, run on every chunk and freed; its logits wait on
  the CPU in the run's dtype; then B is loaded and each chunk's logits (on the run's device) come beside
  A's. Peak memory: one model, plus A's logits for the whole input (tokens × vocabulary × dtype bytes).
- native (`native_pieces`): the streaming engine of `model.py`, one block resident at a time; per chunk,
  A's logits are kept while B's head gives its rows in pieces of at most 64 MiB. The `Meter` counts the
  weights resident.

Invariant: both models see exactly the same ids; a model that transformers does not load cleanly is bad
input (exit 3), never a measurement.
Must not: print; compute the figures; import torch or transformers at module level.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.errors import InputError
from llamapro_cli.verify.progress import Phase, RunProgress

if TYPE_CHECKING:
    import torch

    from llamapro_cli.verify.model import Meter

Piece = tuple[int, int, "torch.Tensor", "torch.Tensor"]  # (chunk, first position, A's rows, B's rows)


def hf_pieces(
    a: Checkpoint,
    b: Checkpoint,
    chunks: Sequence[torch.Tensor],
    device: str,
    dtype: torch.dtype,
    progress: RunProgress,
) -> Iterator[Piece]:
    """A's logits for every chunk, then B's chunk by chunk beside them (one model in memory at a time)."""
    from llamapro_cli.verify.hf_engine import release

    progress(Phase.LOAD_A, 0, 1)
    model = _load(a, "A", device, dtype)
    progress(Phase.LOAD_A, 1, 1)
    try:
        kept: dict[int, torch.Tensor] = {}
        for k, ids in enumerate(chunks):
            kept[k] = _logits(model, ids, device).cpu()  # A's wait on the CPU while B loads
            progress(Phase.RUN_A, k + 1, len(chunks))
    finally:
        del model
        release(device)
    progress(Phase.LOAD_B, 0, 1)
    model = _load(b, "B", device, dtype)
    progress(Phase.LOAD_B, 1, 1)
    try:
        for k, ids in enumerate(chunks):
            got, ref = _logits(model, ids, device), kept.pop(k)  # A's logits go once compared
            progress(Phase.RUN_B, k + 1, len(chunks))
            yield k, 0, ref, got
    finally:
        del model
        release(device)


def _load(ckpt: Checkpoint, label: str, device: str, dtype: torch.dtype) -> Any:
    from llamapro_cli.verify.hf_engine import LoadFailed, load_model, release

    try:
        model, problems = load_model(ckpt.root, device, dtype)
    except LoadFailed as e:
        raise InputError(
            f"transformers cannot load {label} ({ckpt.root}): {e}",
            hint="compare needs a transformers version that supports it; try --engine native",
        ) from None
    if problems:
        del model
        release(device)
        more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
        raise InputError(
            f"transformers does not load {label} ({ckpt.root}) cleanly: {problems[0]}{more}",
            hint="compare needs complete checkpoints (transformers would fill the gaps with random weights)",
        )
    return model


def _logits(model: Any, ids: torch.Tensor, device: str) -> torch.Tensor:
    import torch

    from llamapro_cli.verify.hf_engine import sealed

    with torch.inference_mode(), sealed():
        logits: torch.Tensor = model(input_ids=ids.to(device), use_cache=False).logits
    return logits


def native_pieces(
    a: Checkpoint,
    b: Checkpoint,
    chunks: Sequence[torch.Tensor],
    device: str,
    dtype: torch.dtype,
    meter: Meter,
    progress: RunProgress,
) -> Iterator[Piece]:
    """Per chunk: A block by block to its logits, then B block by block, its head's rows beside A's.
    Run it inside `torch.inference_mode()` (a generator cannot hold the mode across its yields)."""
    from llamapro_cli.verify.model import hidden, opened

    total, done = (a.num_layers + b.num_layers) * len(chunks), [0]

    def tick() -> None:
        done[0] += 1
        progress(Phase.STREAM, done[0], total)

    with opened(a, device, dtype, meter) as model_a, opened(b, device, dtype, meter) as model_b:
        for k, ids in enumerate(chunks):
            ref = _cat(model_a.logits(hidden(model_a, ids, 0, 0, tick)))
            for t, rows in model_b.logits(hidden(model_b, ids, 0, 0, tick)):
                yield k, t, ref[:, t : t + rows.shape[1]], rows


def _cat(pieces: Iterator[tuple[int, torch.Tensor]]) -> torch.Tensor:
    import torch

    return torch.cat([rows for _, rows in pieces], dim=1)


def phases(engine: str, a: Checkpoint, b: Checkpoint, chunks: int) -> list[tuple[Phase, int]]:
    """The run's phases in bytes of weights processed (`progress.py`): each model loaded once and run
    once per chunk (transformers), or both streamed once per chunk (native)."""
    size_a, size_b = a.total_bytes(), b.total_bytes()
    if engine == "native":
        return [(Phase.STREAM, (size_a + size_b) * chunks)]
    return [(Phase.LOAD_A, size_a), (Phase.RUN_A, size_a), (Phase.LOAD_B, size_b), (Phase.RUN_B, size_b)]
