"""What training did to each new layer: how far every tensor moved, and a one-line verdict per layer.

`learning_report(map, trained)` runs the audit (`verify_frozen`) and then, per trainable tensor of each
new layer, streams the trained and the initial values side by side and measures
`‖W_trained − W_initial‖ / ‖W_source‖` (W_source: the same tensor of the layer it was copied from) and,
for the tensors expand zero-initialised (the branch-final ones, whose relative change has no scale), the
RMS of the trained values. A layer "changed" when any of its tensors changed by value; frozen tensors
that changed get the same measures (relative to their own initial norm), and so do `--also` tensors.

The initial values are the expanded checkpoint's (when `--map` is the folder), or else, with a manifest,
the trained checkpoint's own source layers (frozen, so still what the copies started from: the audit
says whether they are) and zeros.

Invariant: tensors are read in element-aligned chunks of at most `CHUNK` bytes per stream (three
streams at most), summed in float64; memory is a few chunks whatever the model size.
Must not: print; choose exit codes; import torch at module level.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llamapro_cli.architectures.families import FAMILIES
from llamapro_cli.architectures.record import Family
from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.freeze.audit import TORCH_DTYPES, FrozenReport, verify_frozen
from llamapro_cli.freeze.manifest import load_manifest
from llamapro_cli.freeze.map import FreezeMap, freeze_map
from llamapro_cli.freeze.trained import TrainedTensor, open_trained
from llamapro_cli.io.ranges import CHUNK, read_chunks

if TYPE_CHECKING:
    import torch

Progress = Callable[[int, int], None]
FROM_EXPANDED = "the expanded checkpoint"
FROM_TRAINED = "the trained checkpoint's frozen source layers (a manifest holds no values)"
FLOATS = ("F64", "F32", "F16", "BF16")


class Kind:
    """How a measured tensor started (plain strings in the JSON)."""

    COPY = "copy"  # a new layer's tensor that started as its source's
    ZERO = "zero-init"  # a new layer's branch-final tensor that expand zeroed
    ORIGINAL = "original"  # a frozen tensor that changed, or an --also tensor


@dataclass(frozen=True)
class TensorMove:
    name: str  # checkpoint key
    layer: int | None  # its layer, None outside the blocks
    kind: str
    changed: bool | None  # by value; None when it could not be measured (missing, not a float)
    delta_norm: float | None  # ‖W_trained − W_initial‖
    source_norm: float | None  # ‖W_source‖ (copies and zero-init: the source layer's; else its own initial)
    relative: float | None  # delta_norm / source_norm
    rms: float | None  # RMS of W_trained − W_initial (for zero-init: of W_trained)


@dataclass(frozen=True)
class LayerMove:
    index: int
    source: int | None
    verdict: str  # "changed", "did not change", "missing"
    tensors: int
    changed_tensors: int
    mean_relative: float | None  # over its copied tensors
    max_relative: float | None
    max_relative_tensor: str | None  # block-relative name
    max_zero_rms: float | None  # over its zero-initialised tensors
    max_zero_rms_tensor: str | None


@dataclass(frozen=True)
class LearningReport:
    """Per new layer and per tensor, how far training moved the weights."""

    initial_values: str
    layers: tuple[LayerMove, ...]
    tensors: tuple[TensorMove, ...]  # every trainable tensor of the new layers
    others: tuple[TensorMove, ...]  # frozen tensors that changed, and --also tensors
    bytes_read: int
    seconds: float


@dataclass(frozen=True)
class TrainingReport:
    """`verify-frozen --report`: the audit and what training did. `--json` prints exactly this."""

    audit: FrozenReport
    learning: LearningReport


def learning_report(
    map_or_expanded: str | Path,
    trained: str | Path,
    *,
    also: Sequence[str] = (),
    progress: Progress | None = None,
) -> TrainingReport:
    """The audit of `trained` against the map, then how far each new layer's tensors moved."""
    started = time.monotonic()
    audit = verify_frozen(map_or_expanded, trained, also=also, progress=progress)
    path = Path(map_or_expanded).expanduser()
    fm = load_manifest(path) if path.is_file() else freeze_map(map_or_expanded, also=also)
    expanded = None if path.is_file() else Checkpoint.open(map_or_expanded)
    measure = _Measure(fm, expanded, Path(trained), progress)
    tensors = tuple(measure.tensor(name) for name in fm.trainable if measure.layer_of(name) in fm.new_layers)
    others = [measure.tensor(c.name, changed=True) for c in audit.changed]
    others += [measure.tensor(n) for n in fm.trainable if measure.layer_of(n) not in fm.new_layers]
    learning = LearningReport(
        initial_values=FROM_EXPANDED if expanded else FROM_TRAINED,
        layers=tuple(_layer(fm, i, tensors) for i in fm.new_layers),
        tensors=tensors,
        others=tuple(others),
        bytes_read=measure.done,
        seconds=round(time.monotonic() - started, 3),
    )
    return TrainingReport(audit, learning)


def _family(fm: FreezeMap) -> Family | None:
    family = next((f for f in FAMILIES if f.name == fm.architecture), None)
    return family.for_checkpoint(fm.tensors) if family else None


class _Measure:
    """Streams trained, initial and source values of one tensor at a time."""

    def __init__(self, fm: FreezeMap, expanded: Checkpoint | None, trained: Path, progress: Progress | None):
        self.fm, self.expanded, self.progress = fm, expanded, progress
        self.family = _family(fm)
        _, self.trained, _, _ = open_trained(trained, fm)
        # fm.sources are indices of the expansion's input; its layers keep their order in the output,
        # around the new ones, so input layer i is the i-th layer that is not new.
        kept = [j for j in range(fm.num_layers) if j not in set(fm.new_layers)]
        self.sources = {
            j: kept[i] for j, i in zip(fm.new_layers, fm.sources or (), strict=False) if 0 <= i < len(kept)
        }
        self.total = sum(t.info.nbytes for t in self.trained.values())
        self.done = 0

    def layer_of(self, name: str) -> int | None:
        if not name.startswith(self.fm.layer_prefix):
            return None
        head = name[len(self.fm.layer_prefix) :].split(".", 1)[0]
        return int(head) if head.isdigit() else None

    def _rel(self, name: str) -> str:
        return name[len(self.fm.layer_prefix) :].split(".", 1)[1]

    def tensor(self, name: str, *, changed: bool | None = None) -> TensorMove:
        """Measure one tensor; `changed`: what the audit found, for a tensor with no initial values."""
        layer = self.layer_of(name)
        new = layer in self.fm.new_layers
        zero = bool(new and self.family and self.family.is_zeroed(self._rel(name)))
        kind = Kind.ZERO if zero else (Kind.COPY if new else Kind.ORIGINAL)
        found, entry = self.trained.get(name), self.fm.tensors.get(name)
        if found is None or entry is None or found.info.dtype not in FLOATS or entry.dtype not in FLOATS:
            return TensorMove(name, layer, kind, changed, None, None, None, None)
        source_key = self._source_key(name, layer) if new else None
        initial = self._initial(name, kind, source_key)
        if initial is None:  # a manifest holds no values of a frozen tensor
            return TensorMove(name, layer, kind, changed, None, None, None, None)
        sq_delta, sq_trained, moved = self._stream(found, initial)
        source = self._norm(source_key) if source_key else None
        if source is None and kind != Kind.ZERO:  # a copy starts equal to its source; an original: itself
            source = self._norm_of(initial)
        numel = max(1, math.prod(found.info.shape))
        delta = math.sqrt(sq_delta)
        rms = math.sqrt((sq_trained if zero else sq_delta) / numel)
        return TensorMove(name, layer, kind, moved, delta, source, delta / source if source else None, rms)

    def _source_key(self, name: str, layer: int | None) -> str | None:
        source = self.sources.get(layer) if layer is not None else None
        if source is None:
            return None
        return f"{self.fm.layer_prefix}{source}.{self._rel(name)}"

    def _initial(self, name: str, kind: str, source_key: str | None) -> _Stream | None:
        info = self.fm.tensors[name]
        if self.expanded is not None:
            path, offset = self.expanded.location(name)
            return _Stream(path, offset, info.dtype, info.shape)
        if kind == Kind.ZERO:
            return _Stream(None, 0, info.dtype, info.shape)
        if kind == Kind.COPY and source_key and source_key in self.trained:
            t = self.trained[source_key]
            return _Stream(t.path, t.offset, t.info.dtype, t.info.shape)
        return None

    def _norm(self, key: str) -> float | None:
        if self.expanded is not None and key in self.expanded.weight_map:
            info = self.expanded.info(key)
            path, offset = self.expanded.location(key)
            return self._norm_of(_Stream(path, offset, info.dtype, info.shape))
        t = self.trained.get(key)
        return self._norm_of(_Stream(t.path, t.offset, t.info.dtype, t.info.shape)) if t else None

    def _norm_of(self, stream: _Stream | None) -> float | None:
        if stream is None or stream.dtype not in FLOATS:
            return None
        total = 0.0
        for chunk in stream.values(_elements()):
            total += float((chunk * chunk).sum())
        return math.sqrt(total)

    def _stream(self, found: TrainedTensor, initial: _Stream) -> tuple[float, float, bool]:
        trained = _Stream(found.path, found.offset, found.info.dtype, found.info.shape)
        sq_delta = sq_trained = 0.0
        changed = False
        step = _elements()
        for t, i in zip(trained.values(step), initial.values(step), strict=True):
            d = t - i
            sq_delta += float((d * d).sum())
            sq_trained += float((t * t).sum())
            changed = changed or bool((t != i).any())
            self.done += t.numel() * found.info.nbytes // max(1, math.prod(found.info.shape))
            if self.progress:
                self.progress(self.done, self.total)
        return sq_delta, sq_trained, changed


def _elements() -> int:
    return max(1, CHUNK // 8)  # float64 copies of a chunk stay within CHUNK bytes


@dataclass(frozen=True)
class _Stream:
    """A tensor's values as float64 chunks of `step` elements; `path` None: all zeros."""

    path: Path | None
    offset: int
    dtype: str
    shape: tuple[int, ...]

    def values(self, step: int) -> Iterator[torch.Tensor]:
        import torch

        numel = math.prod(self.shape)
        dtype = getattr(torch, TORCH_DTYPES[self.dtype])
        width = torch.empty((), dtype=dtype).element_size()
        if self.path is None:
            for start in range(0, numel, step):
                yield torch.zeros(min(step, numel - start), dtype=torch.float64)
            return
        for view in read_chunks(self.path, self.offset, numel * width, step * width):
            yield torch.frombuffer(view, dtype=dtype).to(torch.float64)


def _layer(fm: FreezeMap, index: int, tensors: Sequence[TensorMove]) -> LayerMove:
    mine = [t for t in tensors if t.layer == index]
    source = dict(zip(fm.new_layers, fm.sources or (), strict=False)).get(index)
    measured = [t for t in mine if t.changed is not None]
    changed = [t for t in measured if t.changed]
    copies = [t for t in measured if t.kind == Kind.COPY and t.relative is not None]
    zeros = [t for t in measured if t.kind == Kind.ZERO and t.rms is not None]
    top = max(copies, key=lambda t: t.relative or 0.0, default=None)
    top_zero = max(zeros, key=lambda t: t.rms or 0.0, default=None)
    verdict = "missing" if not measured else ("changed" if changed else "did not change")
    prefix = f"{fm.layer_prefix}{index}."
    return LayerMove(
        index=index,
        source=source,
        verdict=verdict,
        tensors=len(mine),
        changed_tensors=len(changed),
        mean_relative=sum(t.relative or 0.0 for t in copies) / len(copies) if copies else None,
        max_relative=top.relative if top else None,
        max_relative_tensor=top.name.removeprefix(prefix) if top else None,
        max_zero_rms=top_zero.rms if top_zero else None,
        max_zero_rms_tensor=top_zero.name.removeprefix(prefix) if top_zero else None,
    )
