"""The clone engine of `write_shard`: the output shares the source's blocks instead of copying them.

On a copy-on-write filesystem (XFS with `reflink=1`, btrfs, bcachefs, ZFS 2.2+ block cloning, OCFS2)
`ioctl(FICLONERANGE)` makes a block-aligned range of the output point at the source's extents: no data
is read or written, no new space is allocated, and the first later write to either file gives that file
its own copy of the blocks it touches (so the output stays independent of the input). This engine
executes a `clone_plan.ClonePlan`: CLONE operations are one ioctl each, WRITE operations (the header,
the partial blocks at each run's ends, runs at another phase) are assembled in one bounded buffer and
written, HOLE operations are never touched.

The first CLONE of a shard is made before anything is written and is the probe: where the filesystem
refuses it (`REFUSED`: EOPNOTSUPP, EXDEV, EINVAL, ENOTTY, EBADF), `CloneRefused` tells `write_shard` to
use another engine on the still-empty file. A refusal later in the shard (a second source on another
filesystem) makes that range, and the shard's remaining clones, ordinary writes. `clone_supported()`
asks the same question before an expansion, with one real clone into an unnamed temporary file.

Invariant: the bytes of the output equal those the other engines write; memory is one WRITE operation
at most (`clone_plan.WRITE_MAX`); sources are opened read-only; progress runs after each operation, so
signals are handled between them. Must not: import torch, write into a source.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from llamapro_cli.errors import InputError, OutputError
from llamapro_cli.io.clone_plan import WRITE_MAX, Action, ClonePlan, Op, Part, Piece
from llamapro_cli.io.files import os_message
from llamapro_cli.io.header import ALIGN, OutTensor
from llamapro_cli.io.sources import SourceFiles

FICLONERANGE = 0x4020940D  # _IOW(0x94, 13, struct file_clone_range), linux/fs.h
# This pair of files cannot share extents: not a copy-on-write filesystem (ext4, tmpfs), two
# filesystems, a block size or range the filesystem refuses, no such ioctl, a file it will not clone.
REFUSED = frozenset({errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EBADF, errno.ENOSYS})
# Errors that can only come from the output side.
_WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EPERM, errno.EACCES, errno.ETXTBSY}
)


class CloneRefused(Exception):
    """The filesystem refused the shard's first clone: nothing was written, use another engine."""


def clone_range(dst_fd: int, dst: int, src_fd: int, src: int, length: int) -> None:
    """Make `length` bytes of the output at `dst` share the source's blocks at `src` (OSError if not)."""
    fcntl.ioctl(dst_fd, FICLONERANGE, struct.pack("qQQQ", src_fd, src, length, dst))


def clone_supported(source: Path, directory: Path) -> bool:
    """Whether a file created in `directory` can share blocks with `source`: one real clone of its first
    block into an unnamed temporary file (`O_TMPFILE`: nothing appears in the folder, nothing is left)."""
    try:
        src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if os.fstat(src).st_size < ALIGN or not hasattr(os, "O_TMPFILE"):
            return False
        try:
            dst = os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        except OSError:
            return False
        try:
            clone_range(dst, 0, src, 0, ALIGN)
        except OSError:
            return False
        finally:
            os.close(dst)
        return True
    finally:
        os.close(src)


# Bulk: writes the tensors given from a block-aligned output offset (the direct engine, in `writer`).
Bulk = Callable[[int, Sequence[OutTensor]], None]
BULK_MIN = 64 * 1024 * 1024  # a stretch of writes this large goes to `bulk` (where it is given)


class CloneWriter:
    """Executes one shard's clone plan into the open, empty output file `fd`. Stretches of at least
    `BULK_MIN` bytes to write between two clones (a source at another phase) go to `bulk`: the direct
    engine's pipeline, which copies them as fast as a direct-I/O copy."""

    def __init__(
        self,
        fd: int,
        path: Path,
        *,
        progress: Callable[[int], None] | None,
        delay: float = 0.0,
        bulk: Bulk | None = None,
        files: SourceFiles | None = None,
    ) -> None:
        self.fd, self.path, self.progress, self.delay, self.bulk = fd, path, progress, delay, bulk
        self.files, self.own_files = files or SourceFiles(), files is None
        self.sources: dict[Path, tuple[int, int]] = {}  # path -> (fd, size), the fds owned by `files`
        self.buffer = memoryview(bytearray())
        self.cloning = True  # False after a refusal mid-shard: the remaining clones are written

    def write(self, head: bytes, tensors: Sequence[OutTensor], plan: ClonePlan) -> None:
        """Write the shard; CloneRefused (with nothing written) when its first clone is refused."""
        try:
            for t in tensors:
                self._check_range(t)
            probe = next((op for op in plan.ops if op.action is Action.CLONE), None)
            if probe is not None:
                self._clone(probe, probing=True)
            # The final size first: no write extends the file, so XFS makes no speculative allocation
            # past its end, which would stay allocated (unwritten) under the holes that follow.
            try:
                os.ftruncate(self.fd, plan.total)
            except OSError as e:
                raise OutputError(f"cannot write {self.path}: {os_message(e)}") from e
            for stretch in _stretches(plan.ops):
                if self.bulk is not None and _bulk_bytes(stretch) >= BULK_MIN:  # only writes, no header
                    tensors = [_as_tensor(p) for op in stretch for p in op.pieces]
                    self.bulk(stretch[0].dst, tensors)  # reports its own progress
                    continue
                for op in stretch:
                    if op.action is Action.WRITE:
                        self._write(op, head)
                    elif op.action is Action.CLONE and op is not probe:
                        self._clone(op, probing=False)
                    self._done(op)
        finally:
            if self.own_files:
                self.files.close()
            self.sources.clear()

    def _check_range(self, t: OutTensor) -> None:  # as the other engines check, with their words
        if t.source is None:
            return
        if t.source not in self.sources:
            self.sources[t.source] = (self.files.fd(t.source), self.files.size(t.source))
        size = self.sources[t.source][1]
        if t.offset < 0 or t.offset + t.nbytes > size:
            raise InputError(
                f"{t.source} is shorter than expected: tensor {t.name!r} needs bytes "
                f"{t.offset}..{t.offset + t.nbytes}, the file has {size}"
            )

    def _done(self, op: Op) -> None:
        if self.progress is not None:
            self.progress(sum(p.length for p in op.pieces if p.part is not Part.HEADER))
        if self.delay:
            time.sleep(self.delay)

    def _clone(self, op: Op, *, probing: bool) -> None:
        (piece,) = op.pieces
        assert piece.source is not None
        if self.cloning:
            try:
                clone_range(self.fd, op.dst, self.sources[piece.source][0], piece.offset, op.length)
                return
            except OSError as e:
                if probing and e.errno in REFUSED:
                    raise CloneRefused(os_message(e)) from e
                if e.errno in _WRITE_ERRNOS:
                    raise OutputError(f"cannot write {self.path}: {os_message(e)}") from e
                # Refused mid-shard, or an error (EIO…) that the copy below attributes to its side.
                self.cloning = e.errno not in REFUSED
        for start in range(0, op.length, WRITE_MAX):
            n = min(op.length - start, WRITE_MAX)
            part = Piece(Part.SOURCE, n, piece.source, piece.offset + start, piece.name)
            self._write(Op(Action.WRITE, op.dst + start, n, (part,)), b"")

    def _write(self, op: Op, head: bytes) -> None:
        if len(self.buffer) < op.length:
            self.buffer = memoryview(bytearray(op.length))
        view, filled = self.buffer[: op.length], 0
        for piece in op.pieces:
            target = view[filled : filled + piece.length]
            if piece.part is Part.HEADER:
                target[:] = head[piece.offset : piece.offset + piece.length]
            elif piece.part is Part.ZEROS:
                target[:] = bytes(piece.length)
            else:
                self._read(piece, target)
            filled += piece.length
        try:
            done = 0
            while done < op.length:
                done += os.pwrite(self.fd, view[done:], op.dst + done)
        except OSError as e:
            raise OutputError(f"cannot write {self.path}: {os_message(e)}") from e

    def _read(self, piece: Piece, target: memoryview) -> None:
        assert piece.source is not None
        fd, done = self.sources[piece.source][0], 0
        while done < piece.length:
            try:
                got = os.preadv(fd, [target[done:]], piece.offset + done)
            except OSError as e:
                raise InputError(f"cannot read {piece.source}: {os_message(e)}") from e
            if got == 0:
                raise InputError(
                    f"{piece.source} shrank while tensor {piece.name!r} was being copied from it"
                )
            done += got


def _stretches(ops: Sequence[Op]) -> list[list[Op]]:
    """The operations split before and after each clone and each write of header bytes."""
    out: list[list[Op]] = [[]]
    for op in ops:
        alone = op.action is Action.CLONE or any(p.part is Part.HEADER for p in op.pieces)
        if alone and out[-1]:
            out.append([])
        out[-1].append(op)
        if alone:
            out.append([])
    return [stretch for stretch in out if stretch]


def _bulk_bytes(stretch: list[Op]) -> int:
    """The bytes a stretch writes; 0 for a clone or the header's operation (never given to `bulk`)."""
    if any(op.action is Action.CLONE or any(p.part is Part.HEADER for p in op.pieces) for op in stretch):
        return 0
    return sum(op.length for op in stretch if op.action is Action.WRITE)


def _as_tensor(piece: Piece) -> OutTensor:
    return OutTensor(piece.name or "-", "U8", (piece.length,), piece.source, piece.offset)
