"""The buffered engine of `write_shard`: page-cache I/O, one tensor after another.

Each copied tensor goes through `os.copy_file_range` in bounded chunks (the kernel moves the bytes;
on a filesystem that shares extents it may share them), or, where that call cannot serve the pair of
files or digests are wanted, through one buffer of at most a chunk (`preadv` then `write`). Zeros are
holes (`lseek` past them; the caller's final `ftruncate` covers one at the very end). It serves the
small shards (below `writer.DIRECT_MIN`) and every filesystem that refuses `O_DIRECT` (tmpfs).

Invariant: the bytes written equal those of the other engines; memory is one chunk at most; every
chunk ends with the progress callback, so signals are handled between chunks. Must not: import torch,
open a source for writing.
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from llamapro_cli.errors import InputError, OutputError
from llamapro_cli.io.files import os_message
from llamapro_cli.io.header import OutTensor
from llamapro_cli.io.runs import DigestKey, digest_key
from llamapro_cli.io.sources import SourceFiles

# copy_file_range cannot serve this pair of files (other filesystem, old kernel, special file): copy
# through a buffer instead, for the rest of the shard.
_FALLBACK_ERRNOS = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP})
# Errors that can only come from the output side of a copy.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


class BufferedWriter:
    """The state of one shard's buffered write: output fd, open sources, buffer, fallback switch."""

    def __init__(
        self,
        fd: int,
        path: Path,
        *,
        chunk: int,
        digests: bool,
        progress: Callable[[int], None] | None,
        delay: float = 0.0,
        known: Mapping[DigestKey, str] | None = None,
        files: SourceFiles | None = None,
    ) -> None:
        self.fd, self.path, self.chunk, self.digests = fd, path, chunk, digests
        self.progress, self.delay = progress, delay
        self.known = known or {}  # digests of bytes hashed before (an earlier shard): not hashed again
        # Digests read every byte through the buffer anyway, so the kernel-side copy would read twice.
        self.kernel_copy = hasattr(os, "copy_file_range") and not digests
        self.files, self.own_files = files or SourceFiles(), files is None
        self.buffer, self.zeros = memoryview(b""), memoryview(b"")  # grown on demand, up to one chunk

    def write(self, head: bytes, tensors: Sequence[OutTensor]) -> dict[str, str]:
        """Write `head` then `tensors` from the current position; {name: sha256} when digesting.
        Each distinct source range is hashed once (a copied layer reuses its source's digest)."""
        names: dict[str, str] = {}
        by_key = dict(self.known)
        try:
            self.write_all(head)
            for t in tensors:
                key = digest_key(t)
                if key is not None and key in by_key:  # the same bytes as a tensor hashed before
                    self.tensor(t, hashed=False)
                    if self.digests:
                        names[t.name] = by_key[key]
                    continue
                digest = self.tensor(t, hashed=self.digests)
                if digest is not None:
                    names[t.name] = digest
                    if key is not None:
                        by_key[key] = digest
        finally:
            self.close()
        return names

    def close(self) -> None:
        if self.own_files:
            self.files.close()

    def _chunk_done(self, n: int) -> None:
        if self.progress is not None:
            self.progress(n)
        if self.delay:
            time.sleep(self.delay)

    def write_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as e:
            raise OutputError(f"cannot write {self.path}: {os_message(e)}") from e

    def tensor(self, t: OutTensor, *, hashed: bool) -> str | None:
        """Write one tensor at the current position; its sha256 hex when `hashed`."""
        digest = hashlib.sha256() if hashed else None
        if t.source is None:
            self._zeros(t.nbytes, digest)
        else:
            self._copy(t, t.source, digest)
        return digest.hexdigest() if digest else None

    def _zeros(self, nbytes: int, digest: hashlib._Hash | None) -> None:
        # A hole: no I/O, reads back as zeros; the final ftruncate covers a hole at the very end.
        try:
            os.lseek(self.fd, nbytes, os.SEEK_CUR)
        except OSError as e:
            raise OutputError(f"cannot write {self.path}: {os_message(e)}") from e
        if digest is None:
            self._chunk_done(nbytes)
            return
        if len(self.zeros) < min(self.chunk, nbytes):
            self.zeros = memoryview(bytes(min(self.chunk, nbytes)))
        for start in range(0, nbytes, self.chunk):
            n = min(self.chunk, nbytes - start)
            digest.update(self.zeros[:n])
            self._chunk_done(n)

    def _source(self, t: OutTensor, source: Path) -> int:
        fd, size = self.files.fd(source), self.files.size(source)
        if t.offset < 0 or t.offset + t.nbytes > size:
            raise InputError(
                f"{source} is shorter than expected: tensor {t.name!r} needs bytes "
                f"{t.offset}..{t.offset + t.nbytes}, the file has {size}"
            )
        return fd

    def _copy(self, t: OutTensor, source: Path, digest: hashlib._Hash | None) -> None:
        src, offset, end = self._source(t, source), t.offset, t.offset + t.nbytes
        while offset < end:
            n = min(self.chunk, end - offset)
            copied = self._kernel_copy(src, n, offset) if self.kernel_copy else None
            if copied is None:
                copied = self._buffered_copy(src, source, n, offset, digest)
            if copied == 0:
                raise InputError(f"{source} shrank while tensor {t.name!r} was being copied from it")
            offset += copied
            self._chunk_done(copied)

    def _kernel_copy(self, src: int, n: int, offset: int) -> int | None:
        """Bytes copied in the kernel, or None when this chunk must go through the buffer."""
        try:
            return os.copy_file_range(src, self.fd, n, offset)
        except OSError as e:
            if e.errno in _FALLBACK_ERRNOS:
                self.kernel_copy = False
            elif e.errno in _WRITE_ERRNOS:
                raise OutputError(f"cannot write {self.path}: {os_message(e)}") from e
            # Anything else (EIO…) is retried through the buffer, whose error names the failing side.
            return None

    def _buffered_copy(
        self, src: int, source: Path, n: int, offset: int, digest: hashlib._Hash | None
    ) -> int:
        if len(self.buffer) < n:
            self.buffer = memoryview(bytearray(max(n, min(self.chunk, 1 << 20))))
        view = self.buffer[:n]
        try:
            got = os.preadv(src, [view], offset)
        except OSError as e:
            raise InputError(f"cannot read {source}: {os_message(e)}") from e
        if digest is not None:
            digest.update(view[:got])
        self.write_all(view[:got])
        return got
