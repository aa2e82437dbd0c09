"""Reading tensor data: exact byte ranges of a file, whole or in bounded chunks.

The one place tensor bytes are read for checking them (the structural check, the audit, zero tests,
fingerprints, the native engine); `Checkpoint.read_chunks()` puts a tensor name in front of it. Every read
is `pread` at an absolute offset (no mmap, so memory is what we hold), and a short read is an
`InputError`: the file was truncated or changed under us.

Invariant: at most `CHUNK` bytes (or the caller's `step`) are held per reader at a time.
Must not: write anything; import torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from llamapro_cli.errors import InputError

CHUNK = 16 * 1024 * 1024  # bytes per read when checking tensors: large enough for full disk speed


def read_range(path: os.PathLike[str] | str, offset: int, nbytes: int) -> bytes:
    """Exactly `nbytes` at `offset`."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        buffer = bytearray(nbytes)
        read_into(fd, memoryview(buffer), offset, path)
    finally:
        os.close(fd)
    return bytes(buffer)


def read_into(fd: int, view: memoryview, offset: int, path: os.PathLike[str] | str) -> None:
    """Fill `view` from `fd` at `offset` (preadv may return less than asked: 2 GiB per call on Linux)."""
    done, size = 0, len(view)
    while done < size:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise InputError(f"{path}: short read at offset {offset + done} (file truncated or changed)")
        done += got


def read_chunks(
    path: os.PathLike[str] | str, offset: int, nbytes: int, step: int | None = None
) -> Iterator[memoryview]:
    """`nbytes` at `offset` in pieces of at most `step` (default `CHUNK`) bytes, through one reused buffer.

    Each piece is only valid until the next one is requested (consumers hash or compare it at once).
    """
    step = step or CHUNK  # read at call time, so a test can lower CHUNK to cross chunk boundaries
    buffer = bytearray(min(step, nbytes))
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        done = 0
        while done < nbytes:
            n = min(step, nbytes - done)
            view = memoryview(buffer)[:n]
            read_into(fd, view, offset + done, path)
            yield view
            done += n
    finally:
        os.close(fd)
