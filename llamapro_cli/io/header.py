"""The safetensors file format: a strict header reader and a streaming shard writer.

Owns `TensorInfo` / `Header` and `read_header()`, which validates a header as strictly as the
safetensors library does (8-byte little-endian length, size cap, UTF-8 JSON object, dtype × shape =
span, in bounds, contiguous from 0, no overlap, no trailing bytes) and a little more (duplicate keys,
empty names, unknown entry fields). Owns `OutTensor`, `header_bytes()` and `write_shard()`, which writes
a header and then, per tensor, copies a byte range of a source file or leaves a hole for zeros.

Invariant: tensor data is never held in memory. Reads and copies go through bounded buffers (one, or
the direct engine's fixed ring) or `os.copy_file_range` in bounded chunks, so memory is the header plus
a few chunks, whatever the model size, and signals are handled between chunks. Sources are only ever
opened read-only.

Must not: import torch, or interpret tensor values (0 is all-zero bits in every dtype listed here).

Two copy engines: shards with at least 64 MiB to copy go through `direct_io.DirectWriter` (pipelined
O_DIRECT reads and writes, overlapped hashing; ~2 × faster than the page cache on a cold 7B copy,
see docs/performance.md); smaller ones, and filesystems that refuse O_DIRECT (tmpfs), through the
buffered engine here (`os.copy_file_range`, else one buffer). Both write the same bytes.

Environment variables, read at each `write_shard` call:
`LLAMAPRO_DIRECT_IO` — `1` forces the direct-I/O engine (where the filesystem allows), `0` the buffered
one (e.g. on btrfs/XFS, where `copy_file_range` may share extents instead of copying);
`LLAMAPRO_COPY_CHUNK` — bytes per copy chunk (default 64 MiB buffered, 8 MiB direct, where it is
rounded up to 4 KiB), so a small copy takes many chunks; `LLAMAPRO_IO_BUFFERS` — buffers in the direct
engine's ring (default 6; memory is buffers × chunk); `LLAMAPRO_TEST_CHUNK_DELAY` — seconds to sleep
after each chunk, so a test can interrupt a copy mid-way.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from llamapro_cli.errors import InputError, OutputError
from llamapro_cli.io.direct import ALIGN, DirectWriter, enable_direct

# Bits per element. Sub-byte dtypes (F4, F6_*) are packed; a tensor's bit count must fill whole bytes.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
MAX_HEADER_SIZE = 100 * 1024 * 1024  # the safetensors library's cap: a bigger header is refused there too
DEFAULT_CHUNK = 64 * 1024 * 1024
DIRECT_CHUNK = 8 * 1024 * 1024
DIRECT_BUFFERS = 6  # 48 MiB in flight: as fast as 4 x 16 MiB or 2 x 64 MiB here (docs/performance.md)
DIRECT_MIN = 64 * 1024 * 1024  # below this, page-cache I/O is as fast and the files are read back soon
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_CORRUPT = "the file is corrupt or not a safetensors file; re-download or re-create it"
# copy_file_range cannot serve this pair of files (other filesystem, old kernel, special file): copy
# through a buffer instead, for the rest of the shard.
_FALLBACK_ERRNOS = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP})
# Errors that can only come from the output side of a copy.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def tensor_nbytes(dtype: str, shape: Sequence[int]) -> int:
    """Bytes of a tensor; ValueError for an unknown dtype, a negative dim or a partial trailing byte."""
    if dtype not in DTYPE_BITS:
        raise ValueError(f"unknown dtype {dtype!r}")
    if any(d < 0 for d in shape):
        raise ValueError(f"negative dimension in shape {tuple(shape)}")
    bits = DTYPE_BITS[dtype] * math.prod(shape)
    if bits % 8:
        raise ValueError(f"{dtype} tensor of shape {tuple(shape)} does not fill whole bytes")
    return bits // 8


@dataclass(frozen=True)
class TensorInfo:
    """One header entry; `begin`/`end` are relative to the start of the data section, as in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A validated header: every tensor lies in the file, contiguous from 0, ordered by `begin`."""

    path: Path
    header_size: int
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    file_size: int

    @property
    def data_offset(self) -> int:
        return 8 + self.header_size

    def absolute_range(self, name: str) -> tuple[int, int]:
        """(absolute file offset, nbytes) of tensor `name`; KeyError when absent."""
        info = self.tensors[name]
        return self.data_offset + info.begin, info.nbytes


def _corrupt(message: str) -> InputError:
    return InputError(message, hint=_CORRUPT)


def _short(value: object) -> str:
    # A hostile header can hold a megabyte-long shape; a message stays readable.
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _BadKey(Exception):
    pass


def _is_utf8(text: str) -> bool:
    # json.loads accepts lone surrogate escapes ("\ud800") that the library refuses and UTF-8 cannot hold.
    return text.encode("utf-8", "replace").decode("utf-8") == text


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # The library keeps the last of two equal keys; which one a reader sees is ambiguous, so refuse.
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out or not _is_utf8(key):
            raise _BadKey(f"the key {_short(key)} twice" if key in out else "a key that is not valid Unicode")
        out[key] = value
    return out


def _read_raw(path: Path) -> tuple[int, bytes, int]:
    """(header_size, header bytes, file_size), with one bounded read after the length is checked."""
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _corrupt(f"{path} is too small to be a safetensors file ({len(prefix)} bytes)")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_SIZE:
                raise _corrupt(f"{path}: header length {n} exceeds the {MAX_HEADER_SIZE}-byte limit")
            if 8 + n > size:
                raise _corrupt(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"cannot read {path}: {_strerror(e)}") from e
    if len(raw) != n:
        raise InputError(f"{path} shrank while its header was being read")
    return n, raw, size


def _parse_json(path: Path, raw: bytes) -> dict[str, object]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _corrupt(f"{path}: header is not valid UTF-8 (byte {e.start})") from e
    try:
        parsed: object = json.loads(text, object_pairs_hook=_unique_pairs)
    except _BadKey as e:
        raise _corrupt(f"{path}: header has {e}") from e
    except RecursionError as e:
        raise _corrupt(f"{path}: header JSON is nested too deeply") from e
    except ValueError as e:  # JSONDecodeError, and ints beyond Python's digit limit
        raise _corrupt(f"{path}: header is not valid JSON ({e})") from e
    if not isinstance(parsed, dict):
        raise _corrupt(f"{path}: header is not a JSON object")
    return parsed


def _parse_metadata(path: Path, value: object) -> dict[str, str]:
    if value is None:  # the library accepts an explicit null as "no metadata"
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) and _is_utf8(v) for v in value.values()):
        raise _corrupt(f"{path}: __metadata__ is not an object of string values")
    return dict(value)


def _int_list(value: object) -> list[int] | None:
    # bool is an int subclass in Python, but `true` is not a dimension.
    if isinstance(value, list) and all(type(v) is int for v in value):
        return value
    return None


def _span_matches(dtype: str, shape: list[int], span: int) -> bool:
    # Multiply with an early exit: a hostile shape of many huge ints must not cost a huge product.
    if 0 in shape:
        return span == 0
    bits_limit, numel = 8 * span, 1
    for d in shape:
        numel *= d
        if numel * DTYPE_BITS[dtype] > bits_limit:
            return False
    return numel * DTYPE_BITS[dtype] == bits_limit


def _parse_tensor(path: Path, name: str, entry: object, data_len: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not name:
        raise _corrupt(f"{path}: header has a tensor with an empty name")
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        raise _corrupt(f"{where} is not an object with exactly dtype, shape, data_offsets")
    dtype, shape, offsets = entry["dtype"], _int_list(entry["shape"]), _int_list(entry["data_offsets"])
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise InputError(
            f"{where} has unknown dtype {_short(dtype)}", hint="supported: " + ", ".join(DTYPE_BITS)
        )
    if shape is None or any(d < 0 for d in shape):
        raise _corrupt(f"{where} has shape {_short(entry['shape'])}, not a list of non-negative ints")
    if offsets is None or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        raise _corrupt(f"{where} has data_offsets {_short(entry['data_offsets'])}, not [begin, end]")
    begin, end = offsets
    if not _span_matches(dtype, shape, end - begin):
        raise _corrupt(f"{where}: {dtype} shape {_short(shape)} does not match its {end - begin} bytes")
    if end > data_len:
        raise InputError(
            f"{path} is truncated: tensor {name!r} ends at data byte {end}, the data section has {data_len}",
            hint="the file is incomplete (interrupted download?); re-download it",
        )
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def _check_layout(path: Path, tensors: list[TensorInfo], data_len: int) -> None:
    # The format requires the data to be covered exactly: first tensor at 0, each where the last ended.
    position, previous = 0, None
    for t in tensors:
        if t.begin < position:
            raise _corrupt(f"{path}: tensor {t.name!r} overlaps tensor {previous!r}")
        if t.begin > position:
            after = f"after tensor {previous!r}" if previous else "at the start of the data section"
            raise _corrupt(f"{path}: {t.begin - position} unused bytes {after}")
        position, previous = t.end, t.name
    if position != data_len:
        raise _corrupt(f"{path} has {data_len - position} bytes after the last tensor")


def read_header(path: Path) -> Header:
    """Read and validate the header of `path`; InputError (one line, naming the file) when invalid."""
    header_size, raw, file_size = _read_raw(path)
    parsed = _parse_json(path, raw)
    metadata = _parse_metadata(path, parsed.pop("__metadata__", None))
    data_len = file_size - 8 - header_size
    infos = [_parse_tensor(path, name, entry, data_len) for name, entry in parsed.items()]
    infos.sort(key=lambda t: (t.begin, t.end))  # stable: equal (empty) ranges keep header order
    _check_layout(path, infos, data_len)
    return Header(path, header_size, metadata, {t.name: t for t in infos}, file_size)


@dataclass(frozen=True)
class OutTensor:
    """One tensor to write: a byte range of `source` at absolute `offset`, or zeros when `source` is None."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: Path | None = None
    offset: int = 0

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


def header_bytes(tensors: Sequence[OutTensor], metadata: Mapping[str, str], align: int | None = 8) -> bytes:
    """The 8-byte length prefix and the JSON header, space-padded so that the data starts at `align`.

    `align=None` pads for the direct-I/O engine instead: the data starts where most copied bytes sit at
    the same offset modulo 4096 as in their source, so they can be read straight into place (safetensors
    readers skip the spaces; a multiple of 4096 when nothing is copied).
    """
    if align is not None and align < 1:
        raise ValueError(f"align must be positive, not {align}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("safetensors metadata keys and values must be strings")
    doc: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    position = 0
    for t in tensors:
        if not t.name or t.name in doc:
            raise ValueError(f"tensor name {t.name!r} is empty, reserved or repeated")
        end = position + t.nbytes
        doc[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [position, end]}
        position = end
    # Compact separators and raw UTF-8, as the library's serde_json writes them.
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if align is None:
        text += b" " * ((_source_phase(tensors) - 8 - len(text)) % ALIGN)
    else:
        text += b" " * (-(8 + len(text)) % align)
    if len(text) > MAX_HEADER_SIZE:
        raise ValueError(f"header of {len(text)} bytes exceeds the {MAX_HEADER_SIZE}-byte limit")
    return struct.pack("<Q", len(text)) + text


def _source_phase(tensors: Sequence[OutTensor]) -> int:
    """The data start (mod 4096) that puts the most copied bytes at their source offset mod 4096."""
    weight: dict[int, int] = {}
    position = 0
    for t in tensors:
        if t.source is not None:
            phase = (t.offset - position) % ALIGN
            weight[phase] = weight.get(phase, 0) + t.nbytes
        position += t.nbytes
    return max(weight, key=lambda k: (weight[k], -k)) if weight else 0


def _strerror(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


class _Copier:
    """The mutable state of one `write_shard` call: output fd, open sources, buffer, fallback switch."""

    def __init__(self, path: Path, digests: bool, progress: Callable[[int], None] | None) -> None:
        self.path, self.fd, self.digests, self.progress = path, -1, digests, progress
        self.chunk = int(os.environ.get("LLAMAPRO_COPY_CHUNK") or DEFAULT_CHUNK)
        self.delay = float(os.environ.get("LLAMAPRO_TEST_CHUNK_DELAY") or 0)
        if self.chunk < 1:
            raise ValueError(f"LLAMAPRO_COPY_CHUNK must be positive, not {self.chunk}")
        # Digests read every byte through the buffer anyway, so the kernel-side copy would read twice.
        self.kernel_copy = hasattr(os, "copy_file_range") and not digests
        self.sources: dict[Path, tuple[int, int]] = {}  # path -> (fd, size)
        self.buffer, self.zeros = memoryview(b""), memoryview(b"")  # grown on demand, up to one chunk

    def close(self) -> None:
        for fd in [self.fd, *(fd for fd, _ in self.sources.values())]:
            if fd >= 0:
                os.close(fd)
        self.fd = -1
        self.sources.clear()

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
            raise OutputError(f"cannot write {self.path}: {_strerror(e)}") from e

    def tensor(self, t: OutTensor) -> str | None:
        """Write one tensor at the current position; its sha256 hex when digesting."""
        digest = hashlib.sha256() if self.digests else None
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
            raise OutputError(f"cannot write {self.path}: {_strerror(e)}") from e
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
        if source not in self.sources:
            try:
                fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
                self.sources[source] = (fd, os.fstat(fd).st_size)
            except OSError as e:
                raise InputError(f"cannot read {source}: {_strerror(e)}") from e
        fd, size = self.sources[source]
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
                raise OutputError(f"cannot write {self.path}: {_strerror(e)}") from e
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
            raise InputError(f"cannot read {source}: {_strerror(e)}") from e
        if digest is not None:
            digest.update(view[:got])
        self.write_all(view[:got])
        return got


def _use_direct(tensors: Sequence[OutTensor], direct: bool | None) -> bool:
    if direct is None:
        env = os.environ.get("LLAMAPRO_DIRECT_IO", "")
        direct = {"1": True, "0": False}.get(env)
    if direct is None:
        direct = sum(t.nbytes for t in tensors if t.source is not None) >= DIRECT_MIN
    return direct


def _direct_writer(copier: _Copier) -> DirectWriter:
    chunk = int(os.environ.get("LLAMAPRO_COPY_CHUNK") or DIRECT_CHUNK)
    buffers = int(os.environ.get("LLAMAPRO_IO_BUFFERS") or DIRECT_BUFFERS)
    return DirectWriter(
        copier.fd,
        copier.path,
        chunk=chunk,
        buffers=buffers,
        digests=copier.digests,
        progress=copier.progress,
        delay=copier.delay,
    )


def write_shard(
    path: Path,
    tensors: Sequence[OutTensor],
    metadata: Mapping[str, str],
    *,
    digests: bool = False,
    progress: Callable[[int], None] | None = None,
    align: int | None = 8,
    direct: bool | None = None,
) -> dict[str, str]:
    """Write a new safetensors file at `path` (which must not exist); {name: sha256 hex} when `digests`.

    Tensors are laid out contiguously in the order given. On any failure the partial file is removed.
    `direct`: True/False forces the direct-I/O/buffered engine, None decides by size and
    `LLAMAPRO_DIRECT_IO`; the bytes are the same either way (`align=None` suits the direct engine).
    """
    head = header_bytes(tensors, metadata, align)
    total = len(head) + sum(t.nbytes for t in tensors)
    copier = _Copier(path, digests, progress)
    try:
        copier.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {_strerror(e)}") from e
    try:
        if _use_direct(tensors, direct) and enable_direct(copier.fd):
            hashes: dict[str, str | None] = dict(_direct_writer(copier).write(head, tensors))
        else:
            copier.write_all(head)
            hashes = {t.name: copier.tensor(t) for t in tensors}
        try:
            os.ftruncate(copier.fd, total)  # materialises a trailing hole, cuts the last block's padding
            os.fsync(copier.fd)
        except OSError as e:
            raise OutputError(f"cannot write {path}: {_strerror(e)}") from e
    except BaseException:
        # Including KeyboardInterrupt: a half-written shard must not be mistaken for a finished one.
        copier.close()
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    copier.close()
    return {name: h for name, h in hashes.items() if h is not None}
