"""The safetensors file format: a strict header reader and the header layout of the files we write.

Owns `TensorInfo` / `Header` and `read_header()`, which validates a header as strictly as the
safetensors library does (8-byte little-endian length, size cap, UTF-8 JSON object, dtype × shape =
span, in bounds, contiguous from 0, no overlap, no trailing bytes) and a little more (duplicate keys,
empty names, unknown entry fields). Owns `OutTensor` (one tensor of a file to write: a byte range of a
source file, or zeros), `header_bytes()` (its header, padded so that the data keeps the source's block
phase) and `tensor_nbytes()` / `DTYPE_BITS`.

Invariant: only the header is ever read; tensor data is not touched here. Must not: import torch,
interpret tensor values (0 is all-zero bits in every dtype listed here), or write files (the writers
behind `writer.write_shard()` do).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from llamapro_cli.errors import InputError
from llamapro_cli.io.files import os_message
from llamapro_cli.io.sources import FileStamp

# Bits per element. Sub-byte dtypes (F4, F6_*) are packed; a tensor's bit count must fill whole bytes.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
MAX_HEADER_SIZE = 100 * 1024 * 1024  # the safetensors library's cap: a bigger header is refused there too
USIZE_LIMIT = 2**64  # the library's sizes are Rust `usize`s (64-bit): dimensions, counts, offsets
# The block every alignment refers to: it covers 512-byte and 4 KiB logical blocks, and pages.
ALIGN = 4096
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_CORRUPT = "the file is corrupt or not a safetensors file; re-download or re-create it"


def tensor_nbytes(dtype: str, shape: Sequence[int]) -> int:
    """Bytes of a tensor, computed as the safetensors library validates it; ValueError when it refuses.

    The library reads each dimension as a `usize` and folds the element count, then the bit count, with
    overflow detection (`checked_mul`): a dimension of 2**64 or more, or a running product that reaches
    2**64, is refused even when a later dimension is 0 (`[2**40, 2**40, 0]`: "overflow computing buffer
    size"). Checking each factor before multiplying also keeps the cost linear in the shape's length:
    a hostile shape of many huge integers never builds a huge product.
    """
    if dtype not in DTYPE_BITS:
        raise ValueError(f"unknown dtype {dtype!r}")
    numel = 1
    for d in shape:
        if d < 0:
            raise ValueError(f"negative dimension in shape {_short(tuple(shape))}")
        if d >= USIZE_LIMIT:
            raise ValueError(f"dimension {_short(d)} does not fit 64 bits")
        numel *= d
        if numel >= USIZE_LIMIT:
            raise ValueError(f"the element count of shape {_short(tuple(shape))} overflows 64 bits")
    bits = DTYPE_BITS[dtype] * numel
    if bits >= USIZE_LIMIT:
        raise ValueError(
            f"the bit count of a {dtype} tensor of shape {_short(tuple(shape))} overflows 64 bits"
        )
    if bits % 8:
        raise ValueError(f"{dtype} tensor of shape {_short(tuple(shape))} does not fill whole bytes")
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
    stamp: FileStamp | None = None  # the file this header was read from (None: read over HTTP)

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


def _read_raw(path: Path) -> tuple[int, bytes, FileStamp]:
    """(header_size, header bytes, the file's stamp), with one bounded read after the length is checked."""
    try:
        with path.open("rb") as f:
            stamp = FileStamp.of(os.fstat(f.fileno()))
            size = stamp.size
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
        raise InputError(f"cannot read {path}: {os_message(e)}") from e
    if len(raw) != n:
        raise InputError(f"{path} shrank while its header was being read")
    return n, raw, stamp


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
    try:
        nbytes: int | str = tensor_nbytes(dtype, shape)
    except ValueError as e:  # what the library calls ValidationOverflow / MisalignedSlice: refused there
        nbytes = str(e)
    if nbytes != end - begin:
        why = f" ({nbytes}; the safetensors library refuses it)" if isinstance(nbytes, str) else ""
        raise _corrupt(f"{where}: {dtype} shape {_short(shape)} does not match its {end - begin} bytes{why}")
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
    header_size, raw, stamp = _read_raw(path)
    parsed = _parse_json(path, raw)
    metadata = _parse_metadata(path, parsed.pop("__metadata__", None))
    data_len = stamp.size - 8 - header_size
    infos = [_parse_tensor(path, name, entry, data_len) for name, entry in parsed.items()]
    infos.sort(key=lambda t: (t.begin, t.end))  # stable: equal (empty) ranges keep header order
    _check_layout(path, infos, data_len)
    return Header(path, header_size, metadata, {t.name: t for t in infos}, stamp.size, stamp)


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
        text += b" " * ((source_phase(tensors) - 8 - len(text)) % ALIGN)
    else:
        text += b" " * (-(8 + len(text)) % align)
    if len(text) > MAX_HEADER_SIZE:
        # Input-derived (the source's metadata and tensor names): say so, never write an unreadable file.
        longest = max((len(t.name.encode()) for t in tensors), default=0)
        meta_size = len(json.dumps(dict(metadata), ensure_ascii=False).encode())
        raise InputError(
            f"the header would be {len(text)} bytes, over the {MAX_HEADER_SIZE}-byte limit of safetensors "
            f"readers ({meta_size} bytes of metadata, longest tensor name {longest} bytes)",
            hint="the input's shard metadata (__metadata__) or tensor names are too large to carry over",
        )
    return struct.pack("<Q", len(text)) + text


def source_phase(tensors: Sequence[OutTensor]) -> int:
    """The data start (mod 4096) that puts the most copied bytes at their source offset mod 4096."""
    weight: dict[int, int] = {}
    position = 0
    for t in tensors:
        if t.source is not None:
            phase = (t.offset - position) % ALIGN
            weight[phase] = weight.get(phase, 0) + t.nbytes
        position += t.nbytes
    return max(weight, key=lambda k: (weight[k], -k)) if weight else 0
