"""`write_shard()`: the one way a safetensors file is written, whichever engine moves the bytes.

Owns the choice of engine and what every engine shares: the output file is created exclusively
(`O_EXCL`), the header and tensors are written by one engine, then the file is cut to its exact size
(`ftruncate`, which also materialises a trailing hole) and fsynced; on any failure, Ctrl-C included,
the partial file is removed. The engines, all writing the same bytes:

- `clone` (`clone.CloneWriter`): where input and output are on one filesystem that shares extents
  (XFS with reflink, btrfs, …), the whole blocks of each copied run are cloned, nothing is read; only
  the header and the blocks at the runs' edges are written. Tried first; the shard's first clone is the
  probe, and a refusal falls back, silently, to:
- `direct` (`direct.DirectWriter`): pipelined `O_DIRECT`, ~2 × faster than the page cache on a cold
  7B copy (docs/performance.md), for shards with at least `DIRECT_MIN` bytes to copy, where the
  filesystem accepts `O_DIRECT`;
- `buffered` (`buffered.BufferedWriter`): page-cache I/O, for small shards and the rest (tmpfs).

With digests, each distinct source range is hashed once per expansion (`known`, shared across shards):
a copied layer reuses its source's digest, zeros have a precomputed one; the clone engine reads the
ranges it hashes once, with the direct engine's reader (`digests.hash_sources`).

Environment variables, read at each call:
`LLAMAPRO_ENGINE` — `clone`, `direct` or `buffered` forces that engine (`clone` where the filesystem
refuses it is an output error; `direct` falls back to buffered where `O_DIRECT` is refused);
`LLAMAPRO_DIRECT_IO` — `1` / `0`, the older switch: as `LLAMAPRO_ENGINE=direct` / `buffered`;
`LLAMAPRO_COPY_CHUNK` — bytes per copy chunk (default 64 MiB buffered, 8 MiB direct, 16 MiB for the
clone engine's digest reads; rounded up to 4 KiB), so a small copy takes many chunks;
`LLAMAPRO_IO_BUFFERS` — buffers in the direct engine's ring (default 6, 4 for digest reads; memory is
buffers × chunk); `LLAMAPRO_TEST_CHUNK_DELAY` — seconds to sleep
after each chunk, so a test can interrupt a copy mid-way.

Invariant: a file at `path` is either complete and fsynced or absent; sources are only ever opened
read-only; memory is bounded by the engine's buffers, whatever the model size. Must not: import torch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from llamapro_cli.errors import OutputError, UsageError
from llamapro_cli.io.buffered import BufferedWriter
from llamapro_cli.io.clone import Bulk, CloneRefused, CloneWriter, clone_supported
from llamapro_cli.io.clone_plan import Action, plan_clone
from llamapro_cli.io.digests import hash_sources
from llamapro_cli.io.direct import DirectWriter, enable_direct
from llamapro_cli.io.files import os_message
from llamapro_cli.io.header import OutTensor, header_bytes
from llamapro_cli.io.runs import DigestKey, digest_key
from llamapro_cli.io.sources import SourceFiles

DEFAULT_CHUNK = 64 * 1024 * 1024
DIRECT_CHUNK = 8 * 1024 * 1024
DIRECT_BUFFERS = 6  # 48 MiB in flight: as fast as 4 x 16 MiB or 2 x 64 MiB here (docs/performance.md)
DIRECT_MIN = 64 * 1024 * 1024  # below this, page-cache I/O is as fast and the files are read back soon
# The clone engine's --digests pass only reads: two readers of 2 x 16 MiB (64 MiB in flight) kept pace
# with `dd iflag=direct` on a 7B input here, where 2 x 3 x 8 MiB read 10-15 % slower (docs/performance.md).
HASH_CHUNK = 16 * 1024 * 1024
HASH_BUFFERS = 4


class Engine(StrEnum):
    """What moved a shard's bytes."""

    CLONE = "clone"
    DIRECT = "direct"
    BUFFERED = "buffered"


@dataclass(frozen=True)
class Written:
    """One written shard: the engine that wrote it, and {name: sha256 hex} when digests were asked."""

    engine: Engine
    digests: dict[str, str]


def requested_engine() -> Engine | None:
    """The engine `LLAMAPRO_ENGINE` (or the older `LLAMAPRO_DIRECT_IO`) forces; None: choose."""
    text = os.environ.get("LLAMAPRO_ENGINE", "").strip().lower()
    if text:
        try:
            return Engine(text)
        except ValueError:
            raise UsageError(
                f"LLAMAPRO_ENGINE={text!r} is not an engine",
                hint="use clone, direct or buffered, or unset it to choose automatically",
            ) from None
    return {"1": Engine.DIRECT, "0": Engine.BUFFERED}.get(os.environ.get("LLAMAPRO_DIRECT_IO", ""))


def space_needed(shards: Sequence[Sequence[OutTensor]], metadata: Mapping[str, str], directory: Path) -> int:
    """The new disk space that writing `shards` into `directory` allocates (headers aside): every copied
    byte, or, where the clone engine will run, only what it writes (headers, run edges, other phases)."""
    copied = sum(t.nbytes for ts in shards for t in ts if t.source is not None)
    source = next((t.source for ts in shards for t in ts if t.source is not None), None)
    if source is None or requested_engine() not in (None, Engine.CLONE):
        return copied
    if not clone_supported(source, directory):
        return copied
    total = 0
    for tensors in shards:
        plan = plan_clone(tensors, len(header_bytes(tensors, metadata, None)))
        # A shard with nothing to share is written by another engine: every copied byte.
        total += plan.bytes(Action.WRITE) if plan.clones else sum(t.nbytes for t in tensors if t.source)
    return total


def _chunk(default: int) -> int:
    chunk = int(os.environ.get("LLAMAPRO_COPY_CHUNK") or default)
    if chunk < 1:
        raise ValueError(f"LLAMAPRO_COPY_CHUNK must be positive, not {chunk}")
    return chunk


@dataclass(frozen=True)
class _Job:
    """One `write_shard` call, decided before the file is opened."""

    path: Path
    head: bytes
    tensors: Sequence[OutTensor]
    digests: bool
    progress: Callable[[int], None] | None
    delay: float
    known: MutableMapping[DigestKey, str]
    files: SourceFiles | None

    def clone(self, fd: int, *, forced: bool) -> dict[str, str] | None:
        """Write by cloning; None when the filesystem refused the first clone (nothing written)."""
        plan = plan_clone(self.tensors, len(self.head))
        if not plan.clones and not forced:
            return None  # nothing to share (tiny tensors, other phases): the usual engines do as well
        progress = None if self.digests else self.progress  # with digests, hashing reports progress
        writer = CloneWriter(
            fd, self.path, progress=progress, delay=self.delay, bulk=self._bulk(progress), files=self.files
        )
        try:
            writer.write(self.head, self.tensors, plan)
        except CloneRefused as e:
            if forced:
                raise OutputError(
                    f"cannot write {self.path} by sharing extents with the input: {e}",
                    hint="unset LLAMAPRO_ENGINE, or put --out on the input's filesystem (XFS with "
                    "reflink, btrfs, …)",
                ) from e
            return None
        if not self.digests:
            return {}
        buffers = int(os.environ.get("LLAMAPRO_IO_BUFFERS") or HASH_BUFFERS)
        return hash_sources(
            self.tensors,
            self.known,
            chunk=_chunk(HASH_CHUNK),
            buffers=buffers,
            progress=self.progress,
            delay=self.delay,
            files=self.files,
        )

    def _bulk(self, progress: Callable[[int], None] | None) -> Bulk:
        """Copies a long stretch the clone engine cannot share, as the direct engine copies."""

        def bulk(start: int, tensors: Sequence[OutTensor]) -> None:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
            except OSError as e:
                raise OutputError(f"cannot write {self.path}: {os_message(e)}") from e
            try:
                enable_direct(fd)  # where refused, the same writes go through the page cache
                self._direct_writer(fd, digests=False, progress=progress).write(b"", tensors, start=start)
            finally:
                os.close(fd)

        return bulk

    def direct(self, fd: int) -> dict[str, str] | None:
        """Write with O_DIRECT; None where the output's filesystem refuses it."""
        if not enable_direct(fd):
            return None
        writer = self._direct_writer(fd, digests=self.digests, progress=self.progress, known=self.known)
        return writer.write(self.head, self.tensors)

    def _direct_writer(
        self,
        fd: int,
        *,
        digests: bool,
        progress: Callable[[int], None] | None,
        known: Mapping[DigestKey, str] | None = None,
    ) -> DirectWriter:
        """The direct engine on `fd`, with this shard's source files, delay and the ring's size."""
        buffers = int(os.environ.get("LLAMAPRO_IO_BUFFERS") or DIRECT_BUFFERS)
        return DirectWriter(
            fd,
            self.path,
            chunk=_chunk(DIRECT_CHUNK),
            buffers=buffers,
            digests=digests,
            progress=progress,
            delay=self.delay,
            known=known,
            files=self.files,
        )

    def buffered(self, fd: int) -> dict[str, str]:
        writer = BufferedWriter(
            fd,
            self.path,
            chunk=_chunk(DEFAULT_CHUNK),
            digests=self.digests,
            progress=self.progress,
            delay=self.delay,
            known=self.known,
            files=self.files,
        )
        return writer.write(self.head, self.tensors)

    def write(self, fd: int, engine: Engine | None) -> Written:
        """Try the engines in order (clone, direct, buffered), from the one forced, if any."""
        copied = sum(t.nbytes for t in self.tensors if t.source is not None)
        if engine in (None, Engine.CLONE):
            hashes = self.clone(fd, forced=engine is Engine.CLONE)
            if hashes is not None:
                return Written(Engine.CLONE, hashes)
        if engine is Engine.DIRECT or (engine is None and copied >= DIRECT_MIN):
            hashes = self.direct(fd)
            if hashes is not None:
                return Written(Engine.DIRECT, hashes)
        return Written(Engine.BUFFERED, self.buffered(fd))


def write_shard(
    path: Path,
    tensors: Sequence[OutTensor],
    metadata: Mapping[str, str],
    *,
    digests: bool = False,
    progress: Callable[[int], None] | None = None,
    align: int | None = 8,
    engine: Engine | None = None,
    known: MutableMapping[DigestKey, str] | None = None,
    sources: SourceFiles | None = None,
) -> Written:
    """Write a new safetensors file at `path` (which must not exist): which engine wrote it, and
    {name: sha256 hex} when `digests`.

    Tensors are laid out contiguously in the order given. On any failure the partial file is removed.
    `engine` forces one (else `LLAMAPRO_ENGINE`, else the first that works: clone, direct for large
    shards, buffered); the bytes are the same either way. `align=None` pads the header so that copied
    bytes keep their source's block phase (what the clone and direct engines need). `known`: digests
    of source ranges hashed by earlier shards, reused and extended. `sources`: the run's open input
    files (`io.sources`), so every shard reads the files whose headers were read; None opens them for
    this shard alone.
    """
    head = header_bytes(tensors, metadata, align)
    total = len(head) + sum(t.nbytes for t in tensors)
    _chunk(DEFAULT_CHUNK)  # a bad setting is refused before the file exists
    delay = float(os.environ.get("LLAMAPRO_TEST_CHUNK_DELAY") or 0)
    engine = engine or requested_engine()
    job = _Job(path, head, tensors, digests, progress, delay, {} if known is None else known, sources)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {os_message(e)}") from e
    try:
        written = job.write(fd, engine)
        try:
            os.ftruncate(fd, total)  # materialises a trailing hole, cuts the last block's padding
            os.fsync(fd)
        except OSError as e:
            raise OutputError(f"cannot write {path}: {os_message(e)}") from e
    except BaseException:
        # Including KeyboardInterrupt: a half-written shard must not be mistaken for a finished one.
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    os.close(fd)
    if digests:
        job.known.update({key: written.digests[t.name] for t in tensors if (key := digest_key(t))})
    return written
