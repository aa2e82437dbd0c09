"""The safetensors format and the buffered writer: the reader against the real library's files, the
writer against the library's bytes, every validation rule, holes, digests, chunking, the buffered
fallback, and write failures."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from llamapro_cli.errors import InputError, OutputError
from llamapro_cli.io import buffered
from llamapro_cli.io.header import (
    DTYPE_BITS,
    MAX_HEADER_SIZE,
    OutTensor,
    header_bytes,
    read_header,
    tensor_nbytes,
)
from llamapro_cli.io.writer import write_shard

REPO = Path(__file__).resolve().parents[1]
TORCH_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int32: "I32"}


def _torch_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.self_attn.o_proj.weight": (torch.randn(4, 6, generator=g) * 0.02).to(torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight": (torch.randn(3, 5, generator=g) * 0.02).to(torch.float16),
        "model.norm.weight": torch.randn(7, generator=g),
        "lm_head.weight": torch.randn(2, 3, generator=g).double(),
        "ids": torch.arange(-5, 7, dtype=torch.int64).reshape(3, 4),
        "counts": torch.arange(9, dtype=torch.int32),
        "small": torch.arange(5, dtype=torch.int16),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(200, 211, dtype=torch.uint8),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros((0, 3)),
        "ünïcode.weight": torch.ones(2, dtype=torch.bfloat16),
    }


@pytest.fixture(autouse=True)
def _buffered_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer tests here are the buffered engine's, whatever filesystem the temporary folder is on
    (XFS or btrfs would otherwise pick the clone engine); test_direct_io.py and test_clone_io.py hold the
    other engines to the same bytes."""
    monkeypatch.setenv("LLAMAPRO_ENGINE", "buffered")


@pytest.fixture
def lib_file(tmp_path: Path) -> Path:
    path = tmp_path / "lib.safetensors"
    safetensors.torch.save_file(_torch_tensors(), str(path), metadata={"format": "pt"})
    return path


def _raw_file(path: Path, header: object, data: bytes = b"", *, length: int | None = None) -> Path:
    """A file with a hand-made header: `header` is JSON-encoded unless already bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _library_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """Absolute (offset, nbytes) straight from the file's JSON, independently of our reader."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    doc = json.loads(blob[8 : 8 + n])
    doc.pop("__metadata__", None)
    return {
        k: (8 + n + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0]) for k, v in doc.items()
    }


def _copies_of(path: Path, names: list[str] | None = None) -> list[OutTensor]:
    header = read_header(path)
    out = []
    for name in names or list(header.tensors):
        info = header.tensors[name]
        out.append(OutTensor(name, info.dtype, info.shape, path, header.absolute_range(name)[0]))
    return out


# --- reader against the library ---------------------------------------------------------------------


@pytest.mark.parametrize("metadata", [None, {"format": "pt", "note": "ok"}])
def test_reader_accepts_library_files(tmp_path: Path, metadata: dict[str, str] | None) -> None:
    arrays = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array(3.25, dtype=np.float64),
        "c": np.zeros((0, 3), dtype=np.float16),
        "d": np.arange(4, dtype=np.int8),
    }
    path = tmp_path / "np.safetensors"
    safetensors.numpy.save_file(arrays, str(path), metadata=metadata)
    header = read_header(path)
    assert header.metadata == (metadata or {})
    assert header.file_size == path.stat().st_size
    assert {n: header.absolute_range(n) for n in header.tensors} == _library_ranges(path)
    begins = [t.begin for t in header.tensors.values()]
    assert begins == sorted(begins)
    blob = path.read_bytes()
    for name, array in arrays.items():
        info = header.tensors[name]
        assert info.shape == array.shape and info.numel == array.size and info.nbytes == array.nbytes
        offset, nbytes = header.absolute_range(name)
        assert blob[offset : offset + nbytes] == array.tobytes()


def test_reader_accepts_torch_dtypes(lib_file: Path) -> None:
    header = read_header(lib_file)
    tensors = _torch_tensors()
    assert set(header.tensors) == set(tensors)
    assert header.tensors["model.layers.0.self_attn.o_proj.weight"].dtype == "BF16"
    assert header.tensors["scalar"].shape == () and header.tensors["scalar"].nbytes == 4
    with safe_open(str(lib_file), "pt") as f:
        assert header.metadata == f.metadata()
        for name in tensors:
            assert list(header.tensors[name].shape) == f.get_slice(name).get_shape()


def test_reader_accepts_null_metadata(tmp_path: Path) -> None:
    # The library loads `"__metadata__": null` as "no metadata"; so do we.
    assert read_header(_raw_file(tmp_path / "n.safetensors", {"__metadata__": None})).metadata == {}


# --- writer against the library ---------------------------------------------------------------------


def test_golden_bytes_equal_library(lib_file: Path, tmp_path: Path) -> None:
    # Same tensors, same order (the library sorts by alignment then name), one metadata key: same bytes.
    out = tmp_path / "ours.safetensors"
    write_shard(out, _copies_of(lib_file), {"format": "pt"})
    assert out.read_bytes() == lib_file.read_bytes()


def test_other_order_loads_back_exactly(lib_file: Path, tmp_path: Path) -> None:
    names = sorted(read_header(lib_file).tensors, reverse=True)
    out = tmp_path / "ours.safetensors"
    metadata = {"format": "pt", "llamapro": "0.1.0", "ünï": "çödé"}
    write_shard(out, _copies_of(lib_file, names), metadata)
    loaded = safetensors.torch.load_file(str(out))
    for name, tensor in _torch_tensors().items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == metadata
    assert list(read_header(out).tensors) == names  # contiguous in the order given


def test_no_metadata_omits_key(lib_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "ours.safetensors"
    write_shard(out, _copies_of(lib_file), {})
    assert b"__metadata__" not in out.read_bytes()[:200]
    assert read_header(out).metadata == {}


@pytest.mark.parametrize("align", [1, 8, 64, 4096])
def test_header_alignment_and_size_planning(lib_file: Path, tmp_path: Path, align: int) -> None:
    tensors = _copies_of(lib_file)
    head = header_bytes(tensors, {"format": "pt"}, align)
    assert len(head) % align == 0 and head[-1:] in (b"}", b" ")
    out = tmp_path / "a.safetensors"
    write_shard(out, tensors, {"format": "pt"}, align=align)
    assert out.stat().st_size == len(head) + sum(t.nbytes for t in tensors)
    assert read_header(out).data_offset == len(head)


def test_metadata_must_be_strings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="strings"):
        write_shard(tmp_path / "x.safetensors", [], {"n": 1})  # type: ignore[dict-item]
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize(
    ("dtype", "shape", "expected"),
    [("F4", (4,), 2), ("F6_E2M3", (4,), 3), ("BF16", (), 2), ("C64", (2,), 16), ("F32", (0, 3), 0)],
)
def test_tensor_nbytes(dtype: str, shape: tuple[int, ...], expected: int) -> None:
    assert tensor_nbytes(dtype, shape) == expected


@pytest.mark.parametrize(("dtype", "shape"), [("F4", (3,)), ("F6_E3M2", (2,)), ("X9", (1,)), ("F32", (-1,))])
def test_tensor_nbytes_rejects(dtype: str, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        tensor_nbytes(dtype, shape)


# --- holes, digests, progress, chunks, fallback ---------------------------------------------------------


def _mixed(lib_file: Path) -> list[OutTensor]:
    copies = _copies_of(lib_file)
    return [
        OutTensor("zero.first", "BF16", (512, 512)),
        *copies[:3],
        OutTensor("zero.middle", "F32", (3, 5)),
        *copies[3:],
        OutTensor("zero.last", "F16", (1024, 512)),
    ]


def _expected_bytes(tensors: list[OutTensor]) -> dict[str, bytes]:
    out = {}
    for t in tensors:
        if t.source is None:
            out[t.name] = bytes(t.nbytes)
        else:
            with t.source.open("rb") as f:
                f.seek(t.offset)
                out[t.name] = f.read(t.nbytes)
    return out


def _tensor_bytes(path: Path) -> dict[str, bytes]:
    header, blob = read_header(path), path.read_bytes()
    return {n: blob[o : o + k] for n in header.tensors for o, k in [header.absolute_range(n)]}


def test_zeros_are_holes_and_read_as_zeros(lib_file: Path, tmp_path: Path) -> None:
    tensors = _mixed(lib_file)
    out = tmp_path / "z.safetensors"
    write_shard(out, tensors, {"format": "pt"})
    assert _tensor_bytes(out) == _expected_bytes(tensors)
    zero_bytes = sum(t.nbytes for t in tensors if t.source is None)
    st_ = out.stat()
    assert st_.st_size == len(header_bytes(tensors, {"format": "pt"})) + sum(t.nbytes for t in tensors)
    # ~1.5 MiB of zeros, a few KiB of data: allocation stays far below the logical size.
    assert st_.st_blocks * 512 < st_.st_size - zero_bytes + 64 * 1024
    loaded = safetensors.torch.load_file(str(out))
    assert not loaded["zero.last"].any() and loaded["zero.first"].dtype == torch.bfloat16


@pytest.mark.parametrize("chunk", [None, "7", "4096"])
def test_digests_and_progress(
    lib_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: str | None
) -> None:
    if chunk:
        monkeypatch.setenv("LLAMAPRO_COPY_CHUNK", chunk)
    tensors = _mixed(lib_file)
    calls: list[int] = []
    out = tmp_path / "d.safetensors"
    digests = write_shard(out, tensors, {"format": "pt"}, digests=True, progress=calls.append).digests
    expected = {n: hashlib.sha256(b).hexdigest() for n, b in _expected_bytes(tensors).items()}
    assert digests == expected
    assert {n: hashlib.sha256(b).hexdigest() for n, b in _tensor_bytes(out).items()} == expected
    assert sum(calls) == sum(t.nbytes for t in tensors)
    if chunk:
        assert max(calls) <= int(chunk)
        assert len(calls) > len(tensors)


@pytest.mark.parametrize("chunk", ["1", "5", "64"])
def test_small_chunks_give_identical_bytes(
    lib_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: str
) -> None:
    tensors = _mixed(lib_file)
    write_shard(tmp_path / "ref.safetensors", tensors, {"format": "pt"})
    monkeypatch.setenv("LLAMAPRO_COPY_CHUNK", chunk)
    calls: list[int] = []
    written = write_shard(tmp_path / "c.safetensors", tensors, {"format": "pt"}, progress=calls.append)
    assert written.digests == {}
    assert (tmp_path / "c.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    copied = sum(t.nbytes for t in tensors if t.source is not None)
    assert len(calls) >= copied // int(chunk) and sum(calls) == sum(t.nbytes for t in tensors)


def test_chunk_delay_sleeps_after_each_chunk(
    lib_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMAPRO_COPY_CHUNK", "16")
    monkeypatch.setenv("LLAMAPRO_TEST_CHUNK_DELAY", "0.5")
    sleeps: list[float] = []
    monkeypatch.setattr(buffered.time, "sleep", sleeps.append)
    calls: list[int] = []
    write_shard(tmp_path / "s.safetensors", _copies_of(lib_file), {}, progress=calls.append)
    assert len(sleeps) == len(calls) > 10 and set(sleeps) == {0.5}


def _fail_copy(err: int, counter: list[int]) -> Callable[..., int]:
    def copy_file_range(*args: object, **kwargs: object) -> int:
        counter.append(1)
        raise OSError(err, os.strerror(err))

    return copy_file_range


@pytest.mark.parametrize("err", [errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, None])
def test_buffered_fallback_identical(
    lib_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int | None
) -> None:
    tensors = _mixed(lib_file)
    write_shard(tmp_path / "ref.safetensors", tensors, {"format": "pt"})
    monkeypatch.setenv("LLAMAPRO_COPY_CHUNK", "32")
    counter: list[int] = []
    if err is None:
        monkeypatch.delattr(os, "copy_file_range")
    else:
        monkeypatch.setattr(os, "copy_file_range", _fail_copy(err, counter))
    write_shard(tmp_path / "fb.safetensors", tensors, {"format": "pt"})
    assert (tmp_path / "fb.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert len(counter) == (0 if err is None else 1)  # the fallback is remembered for later chunks


# --- write and source failures ------------------------------------------------------------------------


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EFBIG, errno.EDQUOT])
def test_copy_failure_is_output_error(
    lib_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    monkeypatch.setattr(os, "copy_file_range", _fail_copy(err, []))
    out = tmp_path / "f.safetensors"
    with pytest.raises(OutputError) as info:
        write_shard(out, _copies_of(lib_file), {})
    assert info.value.message == f"cannot write {out}: {os.strerror(err)}"
    assert not out.exists()


@pytest.mark.parametrize("digests", [False, True])
def test_write_failure_is_output_error(
    lib_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digests: bool
) -> None:
    real_write, writes = os.write, []

    def write(fd: int, data: bytes) -> int:
        writes.append(fd)
        if len(writes) > 1:  # the header goes through; the first data chunk fails
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.delattr(os, "copy_file_range")
    out = tmp_path / "w.safetensors"
    with pytest.raises(OutputError, match="No space left on device"):
        write_shard(out, _copies_of(lib_file), {}, digests=digests)
    assert not out.exists()


def test_rlimit_fsize_is_output_error(tmp_path: Path) -> None:
    out, source = tmp_path / "big.safetensors", tmp_path / "source.bin"
    source.write_bytes(bytes(100_000))
    script = textwrap.dedent(f"""
        import resource
        from pathlib import Path
        from llamapro_cli.errors import OutputError
        from llamapro_cli.io.header import OutTensor
        from llamapro_cli.io.writer import write_shard
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
        src = Path({str(source)!r})
        try:
            write_shard(Path({str(out)!r}), [OutTensor("t", "U8", (src.stat().st_size,), src, 0)], {{}})
        except OutputError as e:
            print(e.message)
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == f"cannot write {out}: {os.strerror(errno.EFBIG)}"
    assert not out.exists()


def test_existing_output_is_refused(lib_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep")
    with pytest.raises(OutputError, match="File exists"):
        write_shard(out, _copies_of(lib_file), {})
    assert out.read_bytes() == b"keep"


def test_source_range_beyond_file_is_input_error(lib_file: Path, tmp_path: Path) -> None:
    size = lib_file.stat().st_size
    out = tmp_path / "o.safetensors"
    with pytest.raises(InputError, match=f"{lib_file} is shorter than expected: tensor 'x'"):
        write_shard(out, [OutTensor("x", "U8", (16,), lib_file, size - 8)], {})
    assert not out.exists()
    with pytest.raises(InputError, match="cannot read"):
        write_shard(out, [OutTensor("x", "U8", (1,), tmp_path / "missing", 0)], {})


@pytest.mark.parametrize("kernel", [True, False])
def test_source_shrinking_mid_copy_is_input_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: bool
) -> None:
    source = tmp_path / "src.bin"
    source.write_bytes(bytes(range(256)) * 16)
    monkeypatch.setenv("LLAMAPRO_COPY_CHUNK", "1000")
    if not kernel:
        monkeypatch.delattr(os, "copy_file_range")
    out = tmp_path / "o.safetensors"
    with pytest.raises(InputError, match=f"{source} shrank while tensor 't' was being copied"):
        write_shard(
            out, [OutTensor("t", "U8", (4096,), source, 0)], {}, progress=lambda n: os.truncate(source, 1500)
        )
    assert not out.exists()


def test_interrupt_removes_partial_file(
    lib_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMAPRO_COPY_CHUNK", "8")

    def progress(n: int) -> None:
        raise KeyboardInterrupt

    out = tmp_path / "i.safetensors"
    with pytest.raises(KeyboardInterrupt):
        write_shard(out, _copies_of(lib_file), {}, progress=progress)
    assert not out.exists()


# --- every validation rule ------------------------------------------------------------------------------

F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def _entry(**changes: object) -> dict[str, object]:
    return {**F32_2, **changes}


# (id, header (JSON-able or raw bytes), data, declared length or None, expected message fragment)
CASES: list[tuple[str, object, bytes, int | None, str]] = [
    ("length-beyond-file", b"{}", b"", 100, "runs past the end of the file"),
    ("length-beyond-cap", b"{}", b"", MAX_HEADER_SIZE + 1, "exceeds the 104857600-byte limit"),
    ("not-utf8", b'{"\xff": 1}', b"", None, "not valid UTF-8"),
    ("not-json", b'{"a": ', b"", None, "not valid JSON"),
    ("huge-int", b'{"a": ' + b"9" * 5000 + b"}", b"", None, "not valid JSON"),
    ("too-deep", b'{"a": ' + b"[" * 100_000, b"", None, "nested too deeply"),
    ("duplicate-key", b'{"a": 1, "a": 2}', b"", None, "has the key 'a' twice"),
    ("duplicate-nested", b'{"__metadata__": {"k": "1", "k": "2"}}', b"", None, "has the key 'k' twice"),
    ("lone-surrogate", b'{"a\\ud800": 1}', b"", None, "not valid Unicode"),
    ("not-object", [F32_2], b"", None, "not a JSON object"),
    ("metadata-list", {"__metadata__": ["a"]}, b"", None, "__metadata__ is not an object"),
    ("metadata-int-value", {"__metadata__": {"a": 1}}, b"", None, "__metadata__ is not an object"),
    ("metadata-surrogate", b'{"__metadata__": {"a": "\\udc00"}}', b"", None, "__metadata__ is not an object"),
    ("empty-name", {"": F32_2}, bytes(8), None, "empty name"),
    ("entry-not-object", {"w": [1]}, b"", None, "tensor 'w' is not an object with exactly"),
    ("entry-extra-key", {"w": _entry(extra=1)}, bytes(8), None, "tensor 'w' is not an object with exactly"),
    ("entry-missing-key", {"w": {"dtype": "F32", "shape": [2]}}, bytes(8), None, "is not an object with"),
    ("unknown-dtype", {"w": _entry(dtype="F128")}, bytes(8), None, "tensor 'w' has unknown dtype 'F128'"),
    ("dtype-not-string", {"w": _entry(dtype=32)}, bytes(8), None, "tensor 'w' has unknown dtype 32"),
    ("dtype-lowercase", {"w": _entry(dtype="f32")}, bytes(8), None, "unknown dtype 'f32'"),
    ("shape-not-list", {"w": _entry(shape=2)}, bytes(8), None, "tensor 'w' has shape 2, not a list"),
    ("shape-negative", {"w": _entry(shape=[-2])}, bytes(8), None, "not a list of non-negative ints"),
    ("shape-float", {"w": _entry(shape=[2.0])}, bytes(8), None, "not a list of non-negative ints"),
    ("shape-bool", {"w": _entry(shape=[True, 2])}, bytes(8), None, "not a list of non-negative ints"),
    ("offsets-three", {"w": _entry(data_offsets=[0, 4, 8])}, bytes(8), None, "not [begin, end]"),
    ("offsets-reversed", {"w": _entry(data_offsets=[8, 0])}, bytes(8), None, "not [begin, end]"),
    ("offsets-negative", {"w": _entry(data_offsets=[-8, 0])}, bytes(8), None, "not [begin, end]"),
    ("offsets-strings", {"w": _entry(data_offsets=["0", "8"])}, bytes(8), None, "not [begin, end]"),
    ("span-mismatch", {"w": _entry(shape=[3])}, bytes(8), None, "F32 shape [3] does not match its 8 bytes"),
    (
        "subbyte-span",
        {"w": _entry(dtype="F4", shape=[3], data_offsets=[0, 2])},
        bytes(2),
        None,
        "does not match",
    ),
    ("huge-shape", {"w": _entry(shape=[10**30, 10**30])}, bytes(8), None, "does not match its 8 bytes"),
    ("truncated", {"w": F32_2}, bytes(5), None, "is truncated: tensor 'w' ends at data byte 8"),
    (
        "overlap",
        {"a": F32_2, "b": _entry(data_offsets=[4, 12])},
        bytes(12),
        None,
        "tensor 'b' overlaps tensor 'a'",
    ),
    (
        "gap",
        {"a": F32_2, "b": _entry(data_offsets=[12, 20])},
        bytes(20),
        None,
        "4 unused bytes after tensor 'a'",
    ),
    (
        "not-from-zero",
        {"a": _entry(data_offsets=[4, 12])},
        bytes(12),
        None,
        "at the start of the data section",
    ),
    ("trailing-bytes", {"a": F32_2}, bytes(11), None, "has 3 bytes after the last tensor"),
    ("trailing-no-tensors", {}, bytes(1), None, "has 1 bytes after the last tensor"),
]


@pytest.mark.parametrize(
    ("header", "data", "length", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_validation_rule(
    tmp_path: Path, header: object, data: bytes, length: int | None, fragment: str
) -> None:
    path = _raw_file(tmp_path / "bad.safetensors", header, data, length=length)
    before = path.read_bytes()
    with pytest.raises(InputError) as info:
        read_header(path)
    message = info.value.message
    assert str(path) in message and fragment in message
    # One short line apart from the file's path (pytest's temporary paths vary in length).
    assert "\n" not in message and len(message.replace(str(path), "")) < 250 and info.value.hint
    assert path.read_bytes() == before  # the reader never modifies its input


@pytest.mark.parametrize("content", [b"", b"\x01", b"\x00" * 7])
def test_file_shorter_than_8_bytes(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(content)
    with pytest.raises(InputError, match=f"{path} is too small to be a safetensors file"):
        read_header(path)


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_unreadable_path(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "x.safetensors"
    if kind == "directory":
        path.mkdir()
    with pytest.raises(InputError, match=f"cannot read {path}: "):
        read_header(path)


def test_empty_tensors_share_an_offset(tmp_path: Path) -> None:
    # Zero-length tensors sit at the same offset as their neighbour; that is contiguous, not overlap.
    empty = {"dtype": "F16", "shape": [0, 3], "data_offsets": [8, 8]}
    header = read_header(
        _raw_file(tmp_path / "e.safetensors", {"b": _entry(), "a": empty, "c": empty}, bytes(8))
    )
    assert list(header.tensors) == ["b", "a", "c"]


# --- properties ----------------------------------------------------------------------------------------

names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12).filter(lambda s: s != "__metadata__")
specs = st.lists(
    st.tuples(
        names, st.sampled_from(sorted(DTYPE_BITS)), st.lists(st.integers(0, 5), max_size=3), st.booleans()
    ),
    max_size=6,
    unique_by=lambda t: t[0],
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=specs, metadata=st.dictionaries(names, st.text(max_size=8), max_size=3))
def test_round_trip(
    tmp_path_factory: pytest.TempPathFactory,
    specs: list[tuple[str, str, list[int], bool]],
    metadata: dict[str, str],
) -> None:
    tmp = tmp_path_factory.mktemp("rt")
    source = tmp / "source.bin"
    source.write_bytes(os.urandom(4096))
    tensors = []
    for name, dtype, shape, zero in specs:
        if DTYPE_BITS[dtype] * int(np.prod(shape)) % 8:
            shape = [*shape, 8]  # whole bytes for sub-byte dtypes
        tensors.append(OutTensor(name, dtype, tuple(shape), None if zero else source, 17))
    digests = write_shard(tmp / "out.safetensors", tensors, metadata, digests=True).digests
    header = read_header(tmp / "out.safetensors")
    assert header.metadata == metadata
    # Written contiguously in order, so sorting by offset keeps the given order, empty tensors included.
    assert [(t.name, t.dtype, t.shape) for t in header.tensors.values()] == [
        (t.name, t.dtype, t.shape) for t in tensors
    ]
    assert {
        n: hashlib.sha256(b).hexdigest() for n, b in _tensor_bytes(tmp / "out.safetensors").items()
    } == digests
    with safe_open(str(tmp / "out.safetensors"), "np") as f:  # the library accepts what we write
        assert set(f.keys()) == {t.name for t in tensors}


def _valid_file() -> bytes:
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]},
        "b": {"dtype": "F4", "shape": [4], "data_offsets": [8, 10]},
        "c": {"dtype": "I64", "shape": [], "data_offsets": [10, 18]},
    }
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(range(18))


def _check_reader(path: Path, blob: bytes) -> None:
    path.write_bytes(blob)
    try:
        header = read_header(path)
    except InputError as e:
        assert str(path) in e.message and "\n" not in e.message
        return
    position = 0
    for t in header.tensors.values():
        assert t.begin == position and t.nbytes == tensor_nbytes(t.dtype, t.shape)
        position = t.end
    assert header.data_offset + position == header.file_size == len(blob)


mutation = st.tuples(
    st.sampled_from(["flip", "insert", "delete", "truncate"]),
    st.integers(0, 10_000),
    st.binary(min_size=1, max_size=4),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    blob=st.one_of(
        st.binary(max_size=64),
        st.builds(lambda n, b: struct.pack("<Q", n) + b, st.integers(0, 80), st.binary(max_size=80)),
    )
)
def test_random_bytes_never_crash(tmp_path: Path, blob: bytes) -> None:
    _check_reader(tmp_path / "r.safetensors", blob)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_header_never_crashes(tmp_path: Path, mutations: list[tuple[str, int, bytes]]) -> None:
    blob = bytearray(_valid_file())
    for op, at, payload in mutations:
        at %= len(blob) + 1
        if op == "flip" and at < len(blob):
            blob[at] ^= payload[0] or 1
        elif op == "insert":
            blob[at:at] = payload
        elif op == "delete":
            del blob[at : at + len(payload)]
        else:
            del blob[at:]
    _check_reader(tmp_path / "m.safetensors", bytes(blob))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    key=st.sampled_from(["a", "b", "c", "__metadata__"]),
    field=st.sampled_from(["dtype", "shape", "data_offsets", None]),
    value=json_values,
)
def test_mutated_fields_never_crash(tmp_path: Path, key: str, field: str | None, value: object) -> None:
    blob = _valid_file()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    if field is None or key == "__metadata__":
        header[key] = value
    else:
        header[key][field] = value
    raw = json.dumps(header).encode()
    _check_reader(tmp_path / "f.safetensors", struct.pack("<Q", len(raw)) + raw + blob[8 + n :])
