"""The clone plan of one shard: which output blocks share the source's extents, and which are written.

A copy-on-write filesystem (XFS with reflink, btrfs, bcachefs, ZFS 2.2+) can make a range of the output
file share the blocks of a range of a source file (`FICLONERANGE`) instead of copying them, provided
both ranges start on a block boundary and the length is whole blocks. The output header is padded so
that each copied run keeps its source offset modulo 4096 (`header.header_bytes(align=None)`), so inside
every such run the whole 4 KiB blocks line up between source and output:

    output   | header ...|  run A (source 1)        |  run B (zeros)       |  run C ...
    blocks   |  WRITE  |  CLONE  ...  CLONE  | WRITE |  HOLE  ...  HOLE | WRITE |  CLONE ...

- CLONE: the whole blocks inside a run whose phase matches, shared with the source.
- HOLE: the whole blocks inside a zero run, never written (they read as zeros; the writer's final
  `ftruncate` gives the file its size).
- WRITE: everything else, assembled in memory from its pieces and written: the header, the partial
  blocks at each run's ends (which mix the tail of one run and the head of the next), and every run
  whose source phase differs (a second source shard in one output shard), in bounded chunks.

Invariant: the plan is a pure function of the tensor layout (names, sizes, source paths and offsets, and
the header's length): its operations are disjoint, in output order and cover `[0, total)` exactly, and
executing them gives the same bytes as the header followed by every tensor's bytes. CLONE operations
are block-aligned at both ends on both sides. Must not: open a file, import torch.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from llamapro_cli.io.header import ALIGN, OutTensor
from llamapro_cli.io.runs import Run, align_down, align_up, plan_runs

WRITE_MAX = 8 * 1024 * 1024  # the largest WRITE operation: the memory it needs (a multiple of ALIGN)
CLONE_MAX = 1024 * 1024 * 1024  # clones are split so that progress and signals come at least this often


class Part(Enum):
    """Where the bytes of a piece come from."""

    HEADER = "header"
    SOURCE = "source"
    ZEROS = "zeros"


class Action(Enum):
    """What the writer does with an operation's output range."""

    CLONE = "clone"
    WRITE = "write"
    HOLE = "hole"


@dataclass(frozen=True)
class Piece:
    """A stretch of output bytes: `length` bytes of the header (from `offset`), of `source` (from its
    absolute `offset`), or zeros. `name` is the tensor at its first byte, for messages."""

    part: Part
    length: int
    source: Path | None = None
    offset: int = 0
    name: str = ""


@dataclass(frozen=True)
class Op:
    """One operation on the output range `[dst, dst + length)`: its bytes are `pieces` in order
    (a CLONE has one SOURCE piece, a HOLE only ZEROS pieces)."""

    action: Action
    dst: int
    length: int
    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class ClonePlan:
    total: int
    ops: tuple[Op, ...]

    def bytes(self, action: Action) -> int:
        return sum(op.length for op in self.ops if op.action is action)

    @property
    def clones(self) -> bool:
        return any(op.action is Action.CLONE for op in self.ops)


@dataclass(frozen=True)
class _Segment:
    """A stretch of the output in layout order: the header, or one run."""

    start: int
    end: int
    part: Part
    run: Run | None


def plan_clone(
    tensors: Sequence[OutTensor],
    head_len: int,
    *,
    write_max: int = WRITE_MAX,
    clone_max: int = CLONE_MAX,
) -> ClonePlan:
    """The operations that write a shard of `head_len` header bytes followed by `tensors`."""
    if write_max < ALIGN or write_max % ALIGN or clone_max < ALIGN or clone_max % ALIGN:
        raise ValueError("write_max and clone_max must be positive multiples of the block size")
    runs = plan_runs(tensors, head_len)
    segments = [_Segment(0, head_len, Part.HEADER, None)] if head_len else []
    segments += [_Segment(r.start, r.end, Part.SOURCE if r.source else Part.ZEROS, r) for r in runs]
    total = head_len + sum(t.nbytes for t in tensors)
    starts = [s.start for s in segments]
    ops: list[Op] = []
    position = 0
    for run in runs:
        lo, hi = align_up(run.start), align_down(run.end)
        if hi <= lo or (run.source is not None and (run.start - run.offset) % ALIGN):
            continue  # no whole block inside, or a source phase that cannot line up: written
        ops += _writes(segments, starts, position, lo, write_max)
        ops += _shared(run, lo, hi, clone_max)
        position = hi
    ops += _writes(segments, starts, position, total, write_max)
    return ClonePlan(total, tuple(ops))


def _shared(run: Run, lo: int, hi: int, clone_max: int) -> list[Op]:
    """The whole blocks `[lo, hi)` of a run: holes for zeros, clones (at most `clone_max` each)."""
    if run.source is None:
        return [Op(Action.HOLE, lo, hi - lo, (Piece(Part.ZEROS, hi - lo, name=_name_at(run, lo)),))]
    ops = []
    for dst in range(lo, hi, clone_max):
        n = min(clone_max, hi - dst)
        piece = Piece(Part.SOURCE, n, run.source, run.offset + dst - run.start, _name_at(run, dst))
        ops.append(Op(Action.CLONE, dst, n, (piece,)))
    return ops


def _writes(segments: list[_Segment], starts: list[int], lo: int, hi: int, write_max: int) -> list[Op]:
    """WRITE operations of at most `write_max` bytes for `[lo, hi)`; all-zero ones become holes."""
    ops = []
    for dst in range(lo, hi, write_max):
        end = min(dst + write_max, hi)
        pieces = _pieces(segments, starts, dst, end)
        zeros = all(p.part is Part.ZEROS for p in pieces)
        ops.append(Op(Action.HOLE if zeros else Action.WRITE, dst, end - dst, pieces))
    return ops


def _pieces(segments: list[_Segment], starts: list[int], lo: int, hi: int) -> tuple[Piece, ...]:
    pieces = []
    index = bisect.bisect_right(starts, lo) - 1
    while lo < hi:
        seg = segments[index]
        n = min(seg.end, hi) - lo
        if seg.run is None:
            pieces.append(Piece(Part.HEADER, n, offset=lo))
        elif seg.run.source is None:
            pieces.append(Piece(Part.ZEROS, n, name=_name_at(seg.run, lo)))
        else:
            offset = seg.run.offset + lo - seg.run.start
            pieces.append(Piece(Part.SOURCE, n, seg.run.source, offset, _name_at(seg.run, lo)))
        lo += n
        index += 1
    return tuple(pieces)


def _name_at(run: Run, position: int) -> str:
    index = bisect.bisect_right([start for start, _ in run.names], position) - 1
    return run.names[max(index, 0)][1]
