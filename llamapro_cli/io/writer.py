"""`write_shard()`: the one way a safetensors file is written, whichever engine moves the bytes.

Owns the choice of engine and what every engine shares: the output file is created exclusively
(`O_EXCL`), the header and tensors are written by one engine, then the file is cut to its exact size
(`ftruncate`, which also materialises a trailing hole) and fsynced; on any failure, Ctrl-C included,
the partial file is removed. Shards with at least `DIRECT_MIN` bytes to copy go through the direct-I/O
engine (`direct.DirectWriter`: pipelined `O_DIRECT`, ~2 × faster than the page cache on a cold 7B
copy, see docs/performance.md); smaller ones, and filesystems that refuse `O_DIRECT` (tmpfs), through
the buffered engine (`buffered.BufferedWriter`). Both write the same bytes.

Environment variables, read at each `write_shard` call:
`LLAMAPRO_DIRECT_IO` — `1` forces the direct-I/O engine (where the filesystem allows), `0` the buffered
one (e.g. on btrfs/XFS, where `copy_file_range` may share extents instead of copying);
`LLAMAPRO_COPY_CHUNK` — bytes per copy chunk (default 64 MiB buffered, 8 MiB direct, where it is
rounded up to 4 KiB), so a small copy takes many chunks; `LLAMAPRO_IO_BUFFERS` — buffers in the direct
engine's ring (default 6; memory is buffers × chunk); `LLAMAPRO_TEST_CHUNK_DELAY` — seconds to sleep
after each chunk, so a test can interrupt a copy mid-way.

Invariant: a file at `path` is either complete and fsynced or absent; sources are only ever opened
read-only; memory is bounded by the engine's buffers, whatever the model size. Must not: import torch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from llamapro_cli.errors import OutputError
from llamapro_cli.io.buffered import BufferedWriter
from llamapro_cli.io.direct import DirectWriter, enable_direct
from llamapro_cli.io.files import os_message
from llamapro_cli.io.header import OutTensor, header_bytes
from llamapro_cli.io.sources import SourceFiles

DEFAULT_CHUNK = 64 * 1024 * 1024
DIRECT_CHUNK = 8 * 1024 * 1024
DIRECT_BUFFERS = 6  # 48 MiB in flight: as fast as 4 x 16 MiB or 2 x 64 MiB here (docs/performance.md)
DIRECT_MIN = 64 * 1024 * 1024  # below this, page-cache I/O is as fast and the files are read back soon


def _use_direct(tensors: Sequence[OutTensor], direct: bool | None) -> bool:
    if direct is None:
        env = os.environ.get("LLAMAPRO_DIRECT_IO", "")
        direct = {"1": True, "0": False}.get(env)
    if direct is None:
        direct = sum(t.nbytes for t in tensors if t.source is not None) >= DIRECT_MIN
    return direct


def _chunk(default: int) -> int:
    chunk = int(os.environ.get("LLAMAPRO_COPY_CHUNK") or default)
    if chunk < 1:
        raise ValueError(f"LLAMAPRO_COPY_CHUNK must be positive, not {chunk}")
    return chunk


def _write(
    fd: int,
    path: Path,
    head: bytes,
    tensors: Sequence[OutTensor],
    *,
    digests: bool,
    progress: Callable[[int], None] | None,
    direct: bool,
    delay: float,
    files: SourceFiles | None,
) -> dict[str, str]:
    if direct and enable_direct(fd):
        buffers = int(os.environ.get("LLAMAPRO_IO_BUFFERS") or DIRECT_BUFFERS)
        chunk = _chunk(DIRECT_CHUNK)
        writer = DirectWriter(
            fd,
            path,
            chunk=chunk,
            buffers=buffers,
            digests=digests,
            progress=progress,
            delay=delay,
            files=files,
        )
        return writer.write(head, tensors)
    chunk = _chunk(DEFAULT_CHUNK)
    buffered = BufferedWriter(
        fd, path, chunk=chunk, digests=digests, progress=progress, delay=delay, files=files
    )
    return buffered.write(head, tensors)


def write_shard(
    path: Path,
    tensors: Sequence[OutTensor],
    metadata: Mapping[str, str],
    *,
    digests: bool = False,
    progress: Callable[[int], None] | None = None,
    align: int | None = 8,
    direct: bool | None = None,
    sources: SourceFiles | None = None,
) -> dict[str, str]:
    """Write a new safetensors file at `path` (which must not exist); {name: sha256 hex} when `digests`.

    Tensors are laid out contiguously in the order given. On any failure the partial file is removed.
    `direct`: True/False forces the direct-I/O/buffered engine, None decides by size and
    `LLAMAPRO_DIRECT_IO`; the bytes are the same either way (`align=None` suits the direct engine).
    `sources`: the run's open input files (`io.sources`), so every shard reads the files whose headers
    were read; None opens them for this shard alone.
    """
    head = header_bytes(tensors, metadata, align)
    total = len(head) + sum(t.nbytes for t in tensors)
    _chunk(DEFAULT_CHUNK)  # a bad setting is refused before the file exists
    delay = float(os.environ.get("LLAMAPRO_TEST_CHUNK_DELAY") or 0)
    use_direct = _use_direct(tensors, direct)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {os_message(e)}") from e
    try:
        hashes = _write(
            fd,
            path,
            head,
            tensors,
            digests=digests,
            progress=progress,
            direct=use_direct,
            delay=delay,
            files=sources,
        )
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
    return hashes
