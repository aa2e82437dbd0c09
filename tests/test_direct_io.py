"""The direct-I/O engine of `write_shard`: the same bytes and digests as the buffered engine for every
layout (phases, coalesced runs, holes, empty tensors, several sources, tiny chunks), header padding for
it, progress, and each fallback (O_DIRECT refused on the output, on a source, on a read, on a write) and
failure (disk full, read error, shrinking source, Ctrl-C: the partial file goes, the threads stop)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

from llamapro_cli.errors import InputError, OutputError
from llamapro_cli.io import clone, writer
from llamapro_cli.io import direct as direct_io
from llamapro_cli.io.direct import HOLE_MIN
from llamapro_cli.io.header import ALIGN, OutTensor, header_bytes, read_header
from llamapro_cli.io.runs import zeros_sha256
from llamapro_cli.io.writer import Engine, write_shard

MiB = 1 << 20


def _direct_supported(folder: Path) -> bool:
    """Whether the engine gets O_DIRECT on a file in `folder` (its own switch, `enable_direct`)."""
    probe = folder / "probe"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        return direct_io.enable_direct(fd)
    finally:
        os.close(fd)
        probe.unlink()


@pytest.fixture
def sources(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(os.urandom(3 * MiB + 777))
    b.write_bytes(os.urandom(2 * MiB + 5))
    return a, b


@pytest.fixture
def direct_fs(tmp_path: Path) -> None:
    """Skip where tmp_path's filesystem refuses O_DIRECT (tmpfs): the buffered engine runs there."""
    if not _direct_supported(tmp_path):
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT, so the direct engine never runs there")


def _layout(a: Path, b: Path) -> list[OutTensor]:
    """A layer-like mix: adjacent runs (coalesced), a copy re-read, small and hole-sized zeros, odd
    phases, a second source, empty tensors, zeros at both ends."""
    return [
        OutTensor("zero.first", "U8", (HOLE_MIN + 3 * ALIGN + 11,)),
        OutTensor("a.0", "BF16", (1000, 3), a, 1234),  # 6000 bytes at an odd phase
        OutTensor("a.1", "U8", (MiB + 1,), a, 1234 + 6000),  # adjacent in source and output: one run
        OutTensor("empty", "F32", (0, 4), a, 0),
        OutTensor("zero.small", "F16", (3, 5)),
        OutTensor("b.0", "U8", (MiB - 3,), b, 9),
        OutTensor("a.copy", "BF16", (1000, 3), a, 1234),  # the same bytes again
        OutTensor("zero.big", "BF16", (HOLE_MIN,)),  # 2 MiB: a hole
        OutTensor("a.tail", "U8", (MiB // 2 + 13,), a, 2 * MiB + 99),
        OutTensor("b.1", "U8", (4096,), b, 2 * MiB - 4091),  # ends at the end of b
        OutTensor("zero.last", "U8", (3 * MiB + 1,)),
    ]


def _expected(head: bytes, tensors: list[OutTensor]) -> tuple[bytes, dict[str, str]]:
    parts, digests = [head], {}
    for t in tensors:
        if t.source is None:
            data = bytes(t.nbytes)
        else:
            with t.source.open("rb") as f:
                f.seek(t.offset)
                data = f.read(t.nbytes)
        parts.append(data)
        digests[t.name] = hashlib.sha256(data).hexdigest()
    return b"".join(parts), digests


class _Spy:
    """Counts DirectWriter runs (the engine actually used)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.runs = 0
        real = writer.DirectWriter
        spy = self

        class Counting(real):  # type: ignore[misc, valid-type]
            def write(self, *args: Any, **kwargs: Any) -> dict[str, str]:
                spy.runs += 1
                return super().write(*args, **kwargs)

        monkeypatch.setattr(writer, "DirectWriter", Counting)


@pytest.mark.parametrize("chunk", [None, "4096", "12288", "65536", "5000"])
@pytest.mark.parametrize("align", [8, None])
def test_same_bytes_and_digests_as_buffered(
    sources: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    chunk: str | None,
    align: int | None,
) -> None:
    tensors = _layout(*sources)
    head = header_bytes(tensors, {"format": "pt"}, align)
    expected, expected_digests = _expected(head, tensors)
    if chunk:
        monkeypatch.setenv("LLAMAPRO_COPY_CHUNK", chunk)  # 5000 is rounded up to 8192
    spy = _Spy(monkeypatch)
    for engine in (Engine.DIRECT, Engine.BUFFERED):
        out = tmp_path / f"{engine}.safetensors"
        written = write_shard(out, tensors, {"format": "pt"}, digests=True, align=align, engine=engine)
        assert out.read_bytes() == expected
        assert written.digests == expected_digests
    assert spy.runs == (1 if _direct_supported(tmp_path) else 0)


def test_without_digests_returns_nothing(sources: tuple[Path, Path], tmp_path: Path) -> None:
    tensors = _layout(*sources)
    out = tmp_path / "n.safetensors"
    assert write_shard(out, tensors, {}, engine=Engine.DIRECT).digests == {}
    assert out.read_bytes() == _expected(header_bytes(tensors, {}), tensors)[0]


def test_holes_are_not_allocated(direct_fs: None, sources: tuple[Path, Path], tmp_path: Path) -> None:
    tensors = _layout(*sources)
    out = tmp_path / "h.safetensors"
    write_shard(out, tensors, {}, engine=Engine.DIRECT)
    zeros = sum(t.nbytes for t in tensors if t.source is None)
    st = out.stat()
    assert st.st_blocks * 512 < st.st_size - zeros + 6 * ALIGN + 256 * 1024  # only partial blocks written


def test_header_padding_follows_the_source_phase(sources: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = sources
    tensors = _layout(a, b)
    head = header_bytes(tensors, {"format": "pt"}, None)
    position, by_phase = len(head), {}
    for t in tensors:
        if t.source is not None:
            phase = (t.offset - position) % ALIGN
            by_phase[phase] = by_phase.get(phase, 0) + t.nbytes
        position += t.nbytes
    assert by_phase.get(0) == max(by_phase.values())  # the biggest share is read straight into place
    assert len(header_bytes([OutTensor("z", "U8", (5,))], {}, None)) % ALIGN == 0  # nothing copied
    out = tmp_path / "p.safetensors"
    write_shard(out, tensors, {"format": "pt"}, align=None, engine=Engine.DIRECT)
    assert read_header(out).data_offset == len(head)
    with safe_open(str(out), "np") as f:  # the library reads a space-padded header
        assert f.get_tensor("a.1").tobytes() == a.read_bytes()[7234 : 7234 + MiB + 1]
        assert f.get_tensor("b.1").tobytes() == b.read_bytes()[-4096:]


def test_progress_and_delay(
    direct_fs: None, sources: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMAPRO_COPY_CHUNK", "4096")
    monkeypatch.setenv("LLAMAPRO_TEST_CHUNK_DELAY", "0.25")
    sleeps: list[float] = []
    monkeypatch.setattr(direct_io.time, "sleep", sleeps.append)
    tensors = _layout(*sources)
    calls: list[int] = []
    write_shard(tmp_path / "g.safetensors", tensors, {}, progress=calls.append, engine=Engine.DIRECT)
    assert sum(calls) == sum(t.nbytes for t in tensors)
    assert max(calls) <= 4096 and len(sleeps) == len(calls) > 100


def test_auto_selection(
    direct_fs: None, sources: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(clone, "clone_range", _refuse_clone)  # as ext4 answers: no clone engine
    spy = _Spy(monkeypatch)
    tensors = _layout(*sources)
    engines = [write_shard(tmp_path / "1.safetensors", tensors, {}, align=None).engine]  # < DIRECT_MIN
    assert spy.runs == 0
    monkeypatch.setattr(writer, "DIRECT_MIN", MiB)
    engines.append(write_shard(tmp_path / "2.safetensors", tensors, {}).engine)
    assert spy.runs == 1
    monkeypatch.setenv("LLAMAPRO_DIRECT_IO", "0")
    engines.append(write_shard(tmp_path / "3.safetensors", tensors, {}).engine)
    assert spy.runs == 1
    monkeypatch.setenv("LLAMAPRO_DIRECT_IO", "1")
    monkeypatch.setattr(writer, "DIRECT_MIN", 1 << 40)
    engines.append(write_shard(tmp_path / "4.safetensors", tensors, {}).engine)
    assert spy.runs == 2
    monkeypatch.setenv("LLAMAPRO_ENGINE", "buffered")  # the newer switch wins over the older one
    engines.append(write_shard(tmp_path / "5.safetensors", tensors, {}).engine)
    assert spy.runs == 2
    assert engines == [Engine.BUFFERED, Engine.DIRECT, Engine.BUFFERED, Engine.DIRECT, Engine.BUFFERED]


def _refuse_clone(*args: object) -> None:
    raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))


def test_memory_is_the_buffer_ring(
    direct_fs: None, sources: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []
    real = direct_io.mmap.mmap

    def recording(fileno: int, length: int, *args: Any, **kwargs: Any) -> Any:
        sizes.append(length)
        return real(fileno, length, *args, **kwargs)

    monkeypatch.setattr(direct_io.mmap, "mmap", recording)
    monkeypatch.setenv("LLAMAPRO_COPY_CHUNK", str(64 * 1024))
    write_shard(tmp_path / "m.safetensors", _layout(*sources), {}, engine=Engine.DIRECT, digests=True)
    assert sizes == [64 * 1024 + ALIGN] * writer.DIRECT_BUFFERS


# --- fallbacks ------------------------------------------------------------------------------------------


def _check_identical(tensors: list[OutTensor], out: Path) -> None:
    # align=None: most bytes are read with O_DIRECT straight into place, so the fallbacks are reached.
    written = write_shard(out, tensors, {"format": "pt"}, engine=Engine.DIRECT, digests=True, align=None)
    expected, expected_digests = _expected(header_bytes(tensors, {"format": "pt"}, None), tensors)
    assert out.read_bytes() == expected and written.digests == expected_digests


def test_output_refusing_o_direct_uses_buffered_engine(
    sources: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = fcntl.fcntl

    def no_direct(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")  # as tmpfs answers
        return real(fd, cmd, arg)

    monkeypatch.setattr(direct_io.fcntl, "fcntl", no_direct)
    spy = _Spy(monkeypatch)
    _check_identical(_layout(*sources), tmp_path / "o.safetensors")
    assert spy.runs == 0


def test_source_refusing_o_direct_is_read_buffered(
    direct_fs: None, sources: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, refused = os.open, []

    def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_DIRECT and str(path).endswith(".bin"):
            refused.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    _check_identical(_layout(*sources), tmp_path / "s.safetensors")
    assert len(refused) == 2  # one try per source


def test_direct_read_einval_falls_back_once(
    direct_fs: None, sources: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, refused = os.preadv, []

    def preadv(fd: int, buffers: list[Any], offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    _check_identical(_layout(*sources), tmp_path / "r.safetensors")
    assert 1 <= len(refused) <= 2  # then that source is read buffered


def test_direct_write_einval_falls_back(
    direct_fs: None, sources: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, refused = os.pwrite, []

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    _check_identical(_layout(*sources), tmp_path / "w.safetensors")
    assert len(refused) == 1


# --- failures -------------------------------------------------------------------------------------------


def _fails(monkeypatch: pytest.MonkeyPatch, name: str, err: int, after: int = 0) -> Callable[..., int]:
    real, calls = getattr(os, name), []

    def failing(*args: Any) -> int:
        calls.append(1)
        if len(calls) > after:
            raise OSError(err, os.strerror(err))
        return int(real(*args))

    monkeypatch.setattr(os, name, failing)
    return failing


def _no_new_threads(before: int) -> bool:
    return threading.active_count() == before


def test_disk_full_is_output_error(
    direct_fs: None, sources: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMAPRO_COPY_CHUNK", "8192")
    threads = threading.active_count()
    _fails(monkeypatch, "pwrite", errno.ENOSPC, after=3)
    out = tmp_path / "f.safetensors"
    with pytest.raises(OutputError) as info:
        write_shard(out, _layout(*sources), {}, engine=Engine.DIRECT)
    assert info.value.message == f"cannot write {out}: {os.strerror(errno.ENOSPC)}"
    assert not out.exists() and _no_new_threads(threads)


def test_read_error_is_input_error(
    direct_fs: None, sources: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads = threading.active_count()
    _fails(monkeypatch, "preadv", errno.EIO, after=2)
    out = tmp_path / "e.safetensors"
    with pytest.raises(InputError, match=r"cannot read .*\.bin: Input/output error"):
        write_shard(out, _layout(*sources), {}, engine=Engine.DIRECT, digests=True)
    assert not out.exists() and _no_new_threads(threads)


def test_shrinking_source_names_the_tensor(
    sources: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _ = sources
    monkeypatch.setenv("LLAMAPRO_COPY_CHUNK", "8192")
    tensors = [OutTensor("big", "U8", (3 * MiB,), a, 0)]
    out = tmp_path / "s.safetensors"
    with pytest.raises(InputError, match=f"{a} shrank while tensor 'big' was being copied"):
        write_shard(out, tensors, {}, engine=Engine.DIRECT, progress=lambda n: os.truncate(a, MiB))
    assert not out.exists()


def test_source_too_short_and_missing(sources: tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = sources
    out = tmp_path / "t.safetensors"
    with pytest.raises(InputError, match=f"{a} is shorter than expected: tensor 'x'"):
        write_shard(out, [OutTensor("x", "U8", (16,), a, a.stat().st_size - 8)], {}, engine=Engine.DIRECT)
    with pytest.raises(InputError, match="cannot read"):
        write_shard(out, [OutTensor("x", "U8", (1,), tmp_path / "missing", 0)], {}, engine=Engine.DIRECT)
    assert not out.exists()


def test_interrupt_removes_file_and_stops_threads(
    sources: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMAPRO_COPY_CHUNK", "8192")
    threads, seen = threading.active_count(), []

    def progress(n: int) -> None:
        seen.append(n)
        if len(seen) == 50:
            raise KeyboardInterrupt

    out = tmp_path / "i.safetensors"
    with pytest.raises(KeyboardInterrupt):
        write_shard(out, _layout(*sources), {}, engine=Engine.DIRECT, digests=True, progress=progress)
    assert not out.exists() and _no_new_threads(threads)


def test_zero_digest_cache() -> None:
    assert zeros_sha256(0) == hashlib.sha256(b"").hexdigest()
    n = HOLE_MIN * 2 + 5
    assert zeros_sha256(n) == hashlib.sha256(bytes(n)).hexdigest()
