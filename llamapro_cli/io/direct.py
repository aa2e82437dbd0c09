"""The fast path of `write_shard`: a pipelined, direct-I/O (`O_DIRECT`) copy into one output file.

The output is assembled in a small ring of page-aligned buffers (anonymous mmap, `chunk` bytes each).
The calling thread fills a buffer in output order (header bytes, source byte ranges read with
`preadv`, zeros) and hands it to a writer thread, which writes it with one aligned `pwrite`; with
digests, hasher threads (one per core) feed each copied tensor's bytes to sha256 meanwhile (hashlib
releases the GIL on large buffers). Reading, writing and hashing overlap, and no byte goes through the
page cache, whose bookkeeping costs `cp` / `copy_file_range` as much kernel time as the copy itself:
on a cold disk this runs at the speed of a direct-I/O `dd` (docs/performance.md has the figures).

Alignment: a source range is read with `O_DIRECT` straight into its place in the buffer when its
source offset and its output offset agree modulo 4096 (the caller pads the output header so that they
do for most bytes, see `header.header_bytes(align=None)`); the few bytes of the aligned block
before it that the read overwrites are saved and restored. Any other range, a source whose filesystem
refuses `O_DIRECT`, or a read or write that fails with EINVAL goes through ordinary buffered I/O on the
same buffer. Zero runs covering at least 1 MiB of whole 4 KiB blocks are left as holes (never written);
the caller's final `ftruncate` sets the exact size.

Invariant: the bytes written equal those of the buffered writer; memory is `buffers × (chunk + 4 KiB)`
plus the headers, whatever the model size; errors surface in the calling thread, which also runs the
progress callback, so signals and Ctrl-C interrupt between chunks. Must not: import torch.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import functools
import hashlib
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llamapro_cli.errors import InputError, OutputError
from llamapro_cli.io.files import os_message
from llamapro_cli.io.header import ALIGN, OutTensor
from llamapro_cli.io.runs import (
    ZEROS,
    DigestKey,
    Run,
    align_down,
    align_up,
    digest_key,
    plan_runs,
    zeros_sha256,
)
from llamapro_cli.io.sources import SourceFiles

HOLE_MIN = 1 << 20  # zero runs with less than this in whole blocks are written as zeros, not holes


def enable_direct(fd: int) -> bool:
    """Switch an open file to O_DIRECT; False where the OS or filesystem does not support it."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
    except OSError:
        return False
    return True


def disable_direct(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~getattr(os, "O_DIRECT", 0))


@dataclass
class _Job:
    buffer: memoryview
    base: int
    length: int
    segments: list[tuple[int, int, int]] = field(default_factory=list)  # (tensor index, lo, hi)
    refs: int = 1


class _Source:
    """One input file, through the run's `SourceFiles` (which owns the descriptors): a buffered fd, and
    an O_DIRECT fd of the same file while the filesystem accepts it."""

    def __init__(self, files: SourceFiles, path: Path) -> None:
        self.files, self.path = files, path
        self.fd, self.size, self.direct_fd = files.fd(path), files.size(path), files.direct_fd(path)

    def refuse_direct(self) -> None:
        self.files.refuse_direct(self.path)
        self.direct_fd = -1


class DirectWriter:
    """Writes one shard's bytes (header + tensors) through the buffer ring; see the module docstring."""

    def __init__(
        self,
        fd: int,
        path: Path,
        *,
        chunk: int,
        buffers: int,
        digests: bool,
        progress: Callable[[int], None] | None,
        delay: float = 0.0,
        known: Mapping[DigestKey, str] | None = None,
        files: SourceFiles | None = None,
    ) -> None:
        self.fd, self.path, self.digests, self.progress, self.delay = fd, path, digests, progress, delay
        self.files, self.own_files = files or SourceFiles(), files is None
        self.known = known or {}  # digests of bytes hashed before (an earlier shard): not hashed again
        self.chunk = max(ALIGN, align_up(chunk))
        self.maps = [mmap.mmap(-1, self.chunk + ALIGN) for _ in range(max(2, buffers))]
        self.free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for m in self.maps:
            self.free.put(memoryview(m))
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self.queues: list[queue.SimpleQueue[_Job | None]] = []
        self.threads: list[threading.Thread] = []
        self.sources: dict[Path, _Source] = {}
        self.hashes: list[hashlib._Hash | None] = []
        self.buf, self.base, self.fill = memoryview(b""), 0, 0
        self.spans: list[tuple[int, int, int]] = []  # (start, end, tensor index) of tensors to hash
        self.next_span = 0

    # --- the calling thread ------------------------------------------------------------------------------

    def write(self, head: bytes, tensors: Sequence[OutTensor], *, start: int = 0) -> dict[str, str]:
        """Write `head` then `tensors` from offset `start` (a block boundary; the clone engine writes a
        stretch of its file this way); {name: sha256} when digesting."""
        if start % ALIGN:
            raise ValueError(f"start {start} is not a multiple of {ALIGN}")
        self.base = start
        try:
            runs = self._prepare(head, tensors)
            self._start_threads()
            self.buf = self._acquire()
            self._put(memoryview(head))
            for run in runs:
                if run.source is None:
                    self._zeros(run.nbytes)
                else:
                    self._copy(run)
            self._submit()
            self._stop()
        finally:
            self._stop(abort=True)
            self._close()
        return self._digests(tensors)

    def _prepare(self, head: bytes, tensors: Sequence[OutTensor]) -> list[Run]:
        """Check the source ranges; choose the tensors to hash: each distinct source range once."""
        position, first = self.base + len(head), set[DigestKey]()
        self.hashes = [None] * len(tensors)
        for index, t in enumerate(tensors):
            key = digest_key(t)
            if key is not None:
                self._check_range(t)
                if self.digests and key not in self.known and key not in first:
                    first.add(key)
                    self.hashes[index] = hashlib.sha256()
                    self.spans.append((position, position + t.nbytes, index))
            position += t.nbytes
        return plan_runs(tensors, self.base + len(head))

    def _check_range(self, t: OutTensor) -> None:
        assert t.source is not None
        if t.source not in self.sources:
            self.sources[t.source] = _Source(self.files, t.source)
        size = self.sources[t.source].size
        if t.offset < 0 or t.offset + t.nbytes > size:
            raise InputError(
                f"{t.source} is shorter than expected: tensor {t.name!r} needs bytes "
                f"{t.offset}..{t.offset + t.nbytes}, the file has {size}"
            )

    def _acquire(self) -> memoryview:
        while True:
            try:
                buf = self.free.get(timeout=0.2)  # a timeout, so that signal handlers run while we wait
            except queue.Empty:
                buf = None
            if self.error is not None:
                raise self.error
            if buf is not None:
                return buf

    def _chunk_done(self, n: int) -> None:
        if self.progress is not None:
            self.progress(n)
        if self.delay:
            time.sleep(self.delay)

    def _put(self, data: memoryview) -> None:
        while data:
            n = min(len(data), self.chunk - self.fill)
            self.buf[self.fill : self.fill + n] = data[:n]
            self.fill += n
            data = data[n:]
            self._roll()

    def _roll(self) -> None:
        """Hand a full buffer to the writer and continue in the next one."""
        if self.fill == self.chunk:
            self._submit()
            self.base += self.chunk
            self.buf, self.fill = self._acquire(), 0

    def _zeros(self, nbytes: int) -> None:
        start, end = self.base + self.fill, self.base + self.fill + nbytes
        hole_start, hole_end = align_up(start), align_down(end)
        if hole_end - hole_start >= HOLE_MIN:
            self._zero_fill(hole_start - start)
            self._submit()  # ends at hole_start, which is aligned
            self.base, self.buf, self.fill = hole_end, self._acquire(), 0
            self._zero_fill(end - hole_end)
            for offset in range(0, hole_end - hole_start, self.chunk):
                self._chunk_done(min(self.chunk, hole_end - hole_start - offset))
        else:
            self._zero_fill(nbytes)

    def _zero_fill(self, nbytes: int) -> None:
        while nbytes:
            n = min(nbytes, self.chunk - self.fill, len(ZEROS))
            self.buf[self.fill : self.fill + n] = ZEROS[:n]
            self.fill += n
            nbytes -= n
            self._chunk_done(n)
            self._roll()

    def _copy(self, run: Run) -> None:
        assert run.source is not None
        source = self.sources[run.source]
        done = 0
        while done < run.nbytes:
            n = min(run.nbytes - done, self.chunk - self.fill)
            got = self._read(source, run.offset + done, n)
            if got == 0:
                raise InputError(
                    f"{source.path} shrank while tensor {self._name_at(run, done)!r} was being copied from it"
                )
            self.fill += got
            done += got
            self._chunk_done(got)
            self._roll()

    def _name_at(self, run: Run, done: int) -> str:
        index = bisect.bisect_right([start for start, _ in run.names], run.start + done) - 1
        return run.names[max(index, 0)][1]

    def _read(self, source: _Source, offset: int, n: int) -> int:
        """Read up to `n` source bytes into the buffer at `fill`; the bytes read (0 at end of file)."""
        head = offset % ALIGN
        if source.direct_fd >= 0 and (self.fill - head) % ALIGN == 0:
            lo = self.fill - head
            saved = bytes(self.buf[lo : self.fill])
            try:
                got = os.preadv(source.direct_fd, [self.buf[lo : lo + align_up(head + n)]], offset - head)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise InputError(f"cannot read {source.path}: {os_message(e)}") from e
                source.refuse_direct()  # this file or range refuses O_DIRECT: buffered from now on
            else:
                self.buf[lo : self.fill] = saved
                return max(0, min(got - head, n))
        try:
            return os.preadv(source.fd, [self.buf[self.fill : self.fill + n]], offset)
        except OSError as e:
            raise InputError(f"cannot read {source.path}: {os_message(e)}") from e

    def _submit(self) -> None:
        """Queue the filled part of the current buffer (rounded up to whole blocks) for writing."""
        buf, self.buf = self.buf, memoryview(b"")
        if not self.fill:
            self.free.put(buf)
            return
        job = _Job(buf, self.base, align_up(self.fill), self._segments(), refs=len(self.queues))
        for q in self.queues:
            q.put(job)

    def _segments(self) -> list[tuple[int, int, int]]:
        """The copied tensors' bytes in the current buffer, for the hasher."""
        if not self.digests:
            return []
        lo, hi, out = self.base, self.base + self.fill, []
        while self.next_span < len(self.spans) and self.spans[self.next_span][1] <= lo:
            self.next_span += 1
        for start, end, index in self.spans[self.next_span :]:
            if start >= hi:
                break
            out.append((index, max(start, lo) - lo, min(end, hi) - lo))
        return out

    def _digests(self, tensors: Sequence[OutTensor]) -> dict[str, str]:
        if not self.digests:
            return {}
        computed = {
            digest_key(t): h.hexdigest() for t, h in zip(tensors, self.hashes, strict=True) if h is not None
        }
        out = {}
        for t in tensors:
            key = digest_key(t)
            out[t.name] = zeros_sha256(t.nbytes) if key is None else computed.get(key) or self.known[key]
        return out

    # --- the worker threads ------------------------------------------------------------------------------

    def _start_threads(self) -> None:
        # Hashing is the only CPU-heavy part (~1.3 GB/s per core for sha256): one lane per core, each
        # owning every n-th tensor, so each tensor's bytes are still hashed in order by one thread.
        lanes = min(2, os.cpu_count() or 1) if self.digests else 0
        workers = [self._write_job] + [
            functools.partial(self._hash_job, lane, lanes) for lane in range(lanes)
        ]
        for work in workers:
            q: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
            thread = threading.Thread(target=self._loop, args=(q, work), daemon=True)
            self.queues.append(q)
            self.threads.append(thread)
            thread.start()

    def _loop(self, q: queue.SimpleQueue[_Job | None], work: Callable[[_Job], None]) -> None:
        while (job := q.get()) is not None:
            if self.error is None:
                try:
                    work(job)
                except BaseException as e:  # handed to the calling thread, which raises it
                    self.error = self.error or e
            with self.lock:
                job.refs -= 1
                last = job.refs == 0
            if last:
                self.free.put(job.buffer)

    def _write_job(self, job: _Job) -> None:
        if self.fd < 0:  # a read-only pass (`digests.hash_sources`): the bytes are only hashed
            return
        view, offset = job.buffer[: job.length], job.base
        while view:
            try:
                n = os.pwrite(self.fd, view, offset)
            except OSError as e:
                if e.errno == errno.EINVAL and _is_direct(self.fd):
                    disable_direct(self.fd)  # alignment this filesystem refuses: buffered from now on
                    continue
                raise OutputError(f"cannot write {self.path}: {os_message(e)}") from e
            view, offset = view[n:], offset + n

    def _hash_job(self, lane: int, lanes: int, job: _Job) -> None:
        for index, lo, hi in job.segments:
            if index % lanes != lane:
                continue
            digest = self.hashes[index]
            assert digest is not None
            digest.update(job.buffer[lo:hi])

    def _stop(self, *, abort: bool = False) -> None:
        if abort and self.error is None:
            self.error = _Aborted()
        for q in self.queues:
            q.put(None)
        for thread in self.threads:
            thread.join()
        self.queues, self.threads = [], []
        if not abort and self.error is not None:
            raise self.error

    def _close(self) -> None:
        # The maps are unmapped when the last view of them goes (a traceback may still hold one).
        if self.own_files:
            self.files.close()
        self.sources.clear()
        self.buf, self.maps = memoryview(b""), []
        self.free = queue.SimpleQueue()


class _Aborted(Exception):
    """Tells the workers to drop their remaining jobs (the calling thread is already unwinding)."""


def _is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))
