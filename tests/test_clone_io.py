"""The clone engine on any filesystem: its plan is pure and proven (a hypothesis property executes it on
a byte-array model of the files and gets exactly the bytes the direct engine writes), and its executor,
with the kernel's clone replaced by a byte copy that checks alignment as the kernel does, writes those
bytes, reports progress, falls back where the first clone is refused, fails cleanly where it must, and
hashes each source range once. tests/test_clone_xfs.py runs the real thing on a loop-mounted XFS."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llamapro_cli.errors import InputError, OutputError, UsageError
from llamapro_cli.io import clone
from llamapro_cli.io.clone_plan import Action, ClonePlan, Part, Piece, plan_clone
from llamapro_cli.io.digests import hash_sources
from llamapro_cli.io.header import ALIGN, OutTensor, header_bytes
from llamapro_cli.io.runs import DigestKey
from llamapro_cli.io.writer import Engine, requested_engine, space_needed, write_shard

KiB = 1024


# --- the plan: a byte-array model ------------------------------------------------------------------------


def _piece_bytes(piece: Piece, head: bytes, files: dict[Path, bytes]) -> bytes:
    if piece.part is Part.HEADER:
        return head[piece.offset : piece.offset + piece.length]
    if piece.part is Part.ZEROS:
        return bytes(piece.length)
    assert piece.source is not None
    return files[piece.source][piece.offset : piece.offset + piece.length]


def _execute(plan: ClonePlan, head: bytes, files: dict[Path, bytes], write_max: int) -> bytes:
    """Run the plan on a byte array, checking each operation as the kernel and the writer would."""
    out, position = bytearray(plan.total), 0
    for op in plan.ops:
        assert op.dst == position and op.length > 0
        position += op.length
        data = b"".join(_piece_bytes(p, head, files) for p in op.pieces)
        assert len(data) == op.length
        if op.action is Action.CLONE:
            (piece,) = op.pieces
            assert piece.part is Part.SOURCE
            assert op.dst % ALIGN == piece.offset % ALIGN == op.length % ALIGN == 0
        elif op.action is Action.HOLE:
            assert all(p.part is Part.ZEROS for p in op.pieces)
            continue  # never written: reads as zeros
        else:
            assert op.dst % ALIGN == 0 and op.length <= write_max
            _assert_nothing_shareable_written(op.dst, op.pieces)
        out[op.dst : op.dst + op.length] = data
    assert position == plan.total
    return bytes(out)


def _assert_nothing_shareable_written(dst: int, pieces: tuple[Piece, ...]) -> None:
    """A written piece never holds a whole block that could have been cloned or left a hole."""
    for piece in pieces:
        whole_block = -(-dst // ALIGN) * ALIGN + ALIGN <= dst + piece.length
        same_phase = piece.part is Part.SOURCE and (dst - piece.offset) % ALIGN == 0
        assert not (whole_block and (same_phase or piece.part is Part.ZEROS)), piece
        dst += piece.length


def _expected(head: bytes, tensors: list[OutTensor], files: dict[Path, bytes]) -> bytes:
    parts = [head]
    for t in tensors:
        parts.append(bytes(t.nbytes) if t.source is None else files[t.source][t.offset : t.offset + t.nbytes])
    return b"".join(parts)


@st.composite
def layouts(draw: st.DrawFn) -> tuple[list[tuple[int, int]], list[tuple[str, int, int, int]]]:
    """Source files (size, header length) and tensors (kind, source, offset, nbytes): layer-like groups
    of tensors contiguous in their source, copies, zeros, odd sizes and several sources."""
    sources = draw(st.lists(st.tuples(st.integers(16, 9000), st.integers(1, 12)), min_size=1, max_size=3))
    tensors = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()) and draw(st.booleans()):
            tensors.append(("zero", 0, 0, draw(st.sampled_from([0, 6, ALIGN, 3 * ALIGN + 10, 5 * ALIGN]))))
            continue
        index = draw(st.integers(0, len(sources) - 1))
        head, blocks = sources[index]
        offset = head + draw(st.integers(0, blocks * ALIGN // 2))
        for _ in range(draw(st.integers(1, 4))):
            n = draw(st.sampled_from([0, 2, 100, ALIGN, 2 * ALIGN, ALIGN + 6, 3 * ALIGN - 2]))
            n = min(n, head + blocks * ALIGN - offset)
            tensors.append(("copy", index, offset, n))
            offset += n
    return sources, tensors


def _materialise(
    folder: Path, spec: tuple[list[tuple[int, int]], list[tuple[str, int, int, int]]], seed: int
) -> tuple[list[OutTensor], dict[Path, bytes]]:
    sources, specs = spec
    rng = random.Random(seed)
    files: dict[Path, bytes] = {}
    for index, (head, blocks) in enumerate(sources):
        path = folder / f"s{index}.bin"
        files[path] = bytes(rng.getrandbits(8) for _ in range(head + blocks * ALIGN))
        path.write_bytes(files[path])
    paths = list(files)
    tensors = [
        OutTensor(f"t{i}", "U8", (n,), None if kind == "zero" else paths[src], offset)
        for i, (kind, src, offset, n) in enumerate(specs)
    ]
    return tensors, files


@settings(max_examples=100, deadline=None)
@given(
    spec=layouts(),
    seed=st.integers(0, 2**16),
    align=st.sampled_from([None, 8]),
    write_max=st.sampled_from([ALIGN, 2 * ALIGN, 8 * 1024 * KiB]),
    clone_max=st.sampled_from([ALIGN, 3 * ALIGN, 1 << 30]),
    bulk_min=st.sampled_from([1, clone.BULK_MIN]),
)
def test_executing_the_plan_gives_the_direct_engines_bytes(
    spec: Any, seed: int, align: int | None, write_max: int, clone_max: int, bulk_min: int
) -> None:
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as mp:
        tensors, files = _materialise(Path(folder), spec, seed)
        head = header_bytes(tensors, {"format": "pt"}, align)
        plan = plan_clone(tensors, len(head), write_max=write_max, clone_max=clone_max)
        assert plan == plan_clone(tensors, len(head), write_max=write_max, clone_max=clone_max)  # pure
        modelled = _execute(plan, head, files, write_max)
        assert modelled == _expected(head, tensors, files)
        out = Path(folder) / "direct.safetensors"
        write_shard(out, tensors, {"format": "pt"}, align=align, engine=Engine.DIRECT)
        assert out.read_bytes() == modelled
        # The clone engine itself, with the kernel's clone as a checked copy; bulk_min 1: every
        # stretch between clones goes through the direct engine's pipeline at its offset.
        mp.setattr(clone, "clone_range", _checked_copy([]))
        mp.setattr(clone, "BULK_MIN", bulk_min)
        out = Path(folder) / "clone.safetensors"
        write_shard(out, tensors, {"format": "pt"}, align=align, engine=Engine.CLONE)
        assert out.read_bytes() == modelled


def test_aligned_layers_are_cloned_and_only_the_header_block_is_written(tmp_path: Path) -> None:
    source = tmp_path / "s.bin"
    source.write_bytes(os.urandom(100 + 6 * ALIGN))
    layer = [OutTensor(f"a{i}", "U8", (2 * ALIGN,), source, 100 + 2 * ALIGN * i) for i in range(3)]
    copies = [OutTensor(f"copy.{t.name}", "U8", t.shape, source, t.offset) for t in layer]
    tensors = [*layer, OutTensor("zero", "U8", (4 * ALIGN,)), *copies]
    head = header_bytes(tensors, {}, None)
    plan = plan_clone(tensors, len(head))
    assert (len(head) - 100) % ALIGN == 0  # padded to the source's phase
    # Each 6-block run at phase 100 holds 5 whole blocks; the zero run 3; the header's blocks, the block
    # at each run boundary (two runs' bytes, or a run's and zeros) and the last 100 bytes are written.
    assert plan.bytes(Action.CLONE) == 10 * ALIGN and plan.bytes(Action.HOLE) == 3 * ALIGN
    assert plan.bytes(Action.WRITE) == -(-len(head) // ALIGN) * ALIGN + 2 * ALIGN + 100


def test_a_source_at_another_phase_is_written(tmp_path: Path) -> None:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(os.urandom(8 * ALIGN))
    b.write_bytes(os.urandom(8 * ALIGN))
    tensors = [OutTensor("a", "U8", (6 * ALIGN,), a, 0), OutTensor("b", "U8", (2 * ALIGN,), b, 5)]
    plan = plan_clone(tensors, len(header_bytes(tensors, {}, None)))
    written = [p for op in plan.ops if op.action is Action.WRITE for p in op.pieces]
    assert sum(p.length for p in written if p.source == b) == 2 * ALIGN  # all of b
    assert {p.source for op in plan.ops if op.action is Action.CLONE for p in op.pieces} == {a}


# --- the executor, with the kernel's clone replaced by a checked byte copy ---------------------------


def _checked_copy(calls: list[tuple[int, int]]) -> Callable[..., None]:
    """A clone as a byte copy, refused (EINVAL) where the kernel would refuse the alignment."""

    def copy(dst_fd: int, dst: int, src_fd: int, src: int, length: int) -> None:
        if dst % ALIGN or src % ALIGN or length % ALIGN:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        os.pwrite(dst_fd, os.pread(src_fd, length, src), dst)
        calls.append((dst, length))

    return copy


@pytest.fixture
def fake_clone(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int]]]:
    """Clones become checked byte copies; the calls are recorded as (dst, length)."""
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(clone, "clone_range", _checked_copy(calls))
    yield calls


def _refusing(err: int, after: int = 0) -> Callable[..., None]:
    calls: list[int] = []

    def refuse(dst_fd: int, dst: int, src_fd: int, src: int, length: int) -> None:
        calls.append(dst)
        if len(calls) > after:
            raise OSError(err, os.strerror(err))
        os.pwrite(dst_fd, os.pread(src_fd, length, src), dst)

    return refuse


@pytest.fixture
def layout(tmp_path: Path) -> tuple[list[OutTensor], dict[Path, bytes]]:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    files = {a: os.urandom(300 + 40 * ALIGN), b: os.urandom(77 + 9 * ALIGN)}
    for path, data in files.items():
        path.write_bytes(data)
    tensors = [
        OutTensor("a.0", "U8", (3 * ALIGN,), a, 300),
        OutTensor("a.1", "U8", (10 * ALIGN + 5,), a, 300 + 6 * ALIGN),
        OutTensor("zero", "F32", (4 * ALIGN,)),
        OutTensor("b.0", "U8", (5 * ALIGN,), b, 77),  # another phase: written
        OutTensor("a.copy", "U8", (3 * ALIGN,), a, 300),
    ]
    return tensors, files


def _file_bytes(tensors: list[OutTensor], files: dict[Path, bytes]) -> bytes:
    return _expected(header_bytes(tensors, {"format": "pt"}, None), tensors, files)


@pytest.mark.parametrize("bulk_min", [1, clone.BULK_MIN])
def test_clone_engine_writes_the_same_bytes_and_digests(
    fake_clone: list[tuple[int, int]],
    layout: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    bulk_min: int,
) -> None:
    monkeypatch.setattr(clone, "BULK_MIN", bulk_min)  # 1: b.0 and a.copy through the direct pipeline
    tensors, files = layout
    progress: list[int] = []
    out = tmp_path / "c.safetensors"
    written = write_shard(out, tensors, {"format": "pt"}, align=None, digests=True, progress=progress.append)
    expected = _file_bytes(tensors, files)
    assert written.engine is Engine.CLONE and out.read_bytes() == expected
    assert fake_clone and all(dst % ALIGN == 0 for dst, _ in fake_clone)
    assert sum(progress) == sum(t.nbytes for t in tensors)
    for t in tensors:
        data = bytes(t.nbytes) if t.source is None else files[t.source][t.offset : t.offset + t.nbytes]
        assert written.digests[t.name] == hashlib.sha256(data).hexdigest()
    progress.clear()  # without digests, the clones, the writes and the bulk copies report progress
    written = write_shard(
        tmp_path / "n.safetensors", tensors, {"format": "pt"}, align=None, progress=progress.append
    )
    assert written.digests == {} and (tmp_path / "n.safetensors").read_bytes() == expected
    assert sum(progress) == sum(t.nbytes for t in tensors)


@pytest.mark.parametrize("err", sorted(clone.REFUSED))
def test_a_refused_first_clone_falls_back_silently(
    monkeypatch: pytest.MonkeyPatch, layout: Any, tmp_path: Path, err: int
) -> None:
    monkeypatch.setattr(clone, "clone_range", _refusing(err))
    tensors, files = layout
    written = write_shard(tmp_path / "f.safetensors", tensors, {"format": "pt"}, align=None)
    assert written.engine is Engine.BUFFERED  # small: the buffered engine, as without a clone engine
    assert (tmp_path / "f.safetensors").read_bytes() == _file_bytes(tensors, files)


def test_a_refusal_mid_shard_writes_the_rest(
    monkeypatch: pytest.MonkeyPatch, layout: Any, tmp_path: Path
) -> None:
    monkeypatch.setattr(clone, "clone_range", _refusing(errno.EXDEV, after=1))
    tensors, files = layout
    written = write_shard(tmp_path / "m.safetensors", tensors, {"format": "pt"}, align=None)
    assert written.engine is Engine.CLONE
    assert (tmp_path / "m.safetensors").read_bytes() == _file_bytes(tensors, files)


def test_forced_clone_where_refused_is_an_output_error(
    monkeypatch: pytest.MonkeyPatch, layout: Any, tmp_path: Path
) -> None:
    monkeypatch.setattr(clone, "clone_range", _refusing(errno.EOPNOTSUPP))
    monkeypatch.setenv("LLAMAPRO_ENGINE", "clone")
    out = tmp_path / "x.safetensors"
    with pytest.raises(OutputError, match="by sharing extents with the input: Operation not supported") as e:
        write_shard(out, layout[0], {"format": "pt"}, align=None)
    assert e.value.hint and "LLAMAPRO_ENGINE" in e.value.hint and not out.exists()


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_while_cloning_is_an_output_error(
    monkeypatch: pytest.MonkeyPatch, layout: Any, tmp_path: Path, err: int
) -> None:
    monkeypatch.setattr(clone, "clone_range", _refusing(err, after=1))
    out = tmp_path / "d.safetensors"
    with pytest.raises(OutputError) as e:
        write_shard(out, layout[0], {"format": "pt"}, align=None)
    assert e.value.message == f"cannot write {out}: {os.strerror(err)}" and not out.exists()


def test_interrupt_between_operations_removes_the_file(
    fake_clone: list[tuple[int, int]], layout: Any, tmp_path: Path
) -> None:
    def progress(n: int) -> None:
        if fake_clone:
            raise KeyboardInterrupt

    out = tmp_path / "i.safetensors"
    with pytest.raises(KeyboardInterrupt):
        write_shard(out, layout[0], {"format": "pt"}, align=None, progress=progress)
    assert not out.exists()


def test_short_and_shrinking_sources_are_input_errors(
    fake_clone: list[tuple[int, int]], layout: Any, tmp_path: Path
) -> None:
    tensors, files = layout
    a, b = tensors[0].source, tensors[3].source
    assert a is not None and b is not None
    out = tmp_path / "s.safetensors"
    with pytest.raises(InputError, match=f"{a} is shorter than expected: tensor 'x'"):
        write_shard(out, [OutTensor("x", "U8", (ALIGN,), a, len(files[a]))], {}, engine=Engine.CLONE)
    # b.0 (another phase) is read after the first clones: it shrinks in between.
    with pytest.raises(InputError, match=f"{b} shrank while tensor 'b.0' was being copied from it"):
        write_shard(out, tensors, {}, align=None, progress=lambda n: os.truncate(b, 100))
    assert not out.exists()


def test_engine_variable_is_checked() -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMAPRO_ENGINE", "Clone ")
        assert requested_engine() is Engine.CLONE
        mp.setenv("LLAMAPRO_ENGINE", "fast")
        with pytest.raises(UsageError, match="LLAMAPRO_ENGINE='fast' is not an engine"):
            requested_engine()
        mp.delenv("LLAMAPRO_ENGINE")
        mp.setenv("LLAMAPRO_DIRECT_IO", "0")
        assert requested_engine() is Engine.BUFFERED


def test_free_space_without_cloning_counts_every_copied_byte(
    monkeypatch: pytest.MonkeyPatch, layout: Any, tmp_path: Path
) -> None:
    tensors, _ = layout
    copied = sum(t.nbytes for t in tensors if t.source is not None)
    monkeypatch.setattr(clone, "clone_range", _refusing(errno.EOPNOTSUPP))
    assert space_needed([tensors], {}, tmp_path) == copied
    monkeypatch.setattr(clone, "clone_range", lambda *args: None)  # a filesystem that clones
    needed = space_needed([tensors], {}, tmp_path)
    # b.0 and a.copy (other phases) are written, and the header's and the runs' end blocks; the 11
    # whole blocks of a.0 and a.1 are shared.
    assert 8 * ALIGN < needed < copied - 8 * ALIGN
    monkeypatch.setenv("LLAMAPRO_ENGINE", "direct")
    assert space_needed([tensors], {}, tmp_path) == copied


# --- digests: each source range read once --------------------------------------------------------------


def test_each_source_range_is_hashed_once(
    monkeypatch: pytest.MonkeyPatch, layout: Any, tmp_path: Path
) -> None:
    tensors, files = layout
    real, read = os.preadv, []

    def counting(fd: int, buffers: list[Any], offset: int) -> int:
        n = real(fd, buffers, offset)
        read.append(n)
        return n

    monkeypatch.setattr(os, "preadv", counting)
    known: dict[DigestKey, str] = {}
    progress: list[int] = []
    digests = hash_sources(tensors, known, chunk=64 * KiB, buffers=3, progress=progress.append)
    distinct = sum(t.nbytes for t in tensors[:2]) + tensors[3].nbytes  # a.copy is a.0 again
    assert distinct <= sum(read) <= distinct + 4 * ALIGN  # block-aligned reads: a block at each end
    assert sum(progress) == sum(t.nbytes for t in tensors)
    for t in tensors:
        data = bytes(t.nbytes) if t.source is None else files[t.source][t.offset : t.offset + t.nbytes]
        assert digests[t.name] == hashlib.sha256(data).hexdigest()
    read.clear()
    assert hash_sources(tensors, known, chunk=64 * KiB, buffers=3, progress=None) == digests
    assert read == []  # known from before: nothing read again


@pytest.mark.parametrize("split_min", [0, 1 << 40], ids=["two-readers", "one-reader"])
def test_two_readers_hash_each_range_once_and_exactly(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, split_min: int
) -> None:
    # Both cores hash: the ranges of a file are read in two halves side by side. Every digest must
    # still be the sha256 of exactly its range, each range read once, progress counted once.
    from llamapro_cli.io import digests as digests_module

    monkeypatch.setattr(digests_module, "SPLIT_MIN", split_min)
    monkeypatch.setattr(digests_module.os, "cpu_count", lambda: 2)
    source = tmp_path / "src.bin"
    data = random.Random(5).randbytes(300 + 37 * 64 * KiB + 12_345)
    source.write_bytes(data)
    sizes = [5 * 64 * KiB + 17, 9 * 64 * KiB, 3 * 64 * KiB + 4000, 11 * 64 * KiB, 8 * 64 * KiB + 5]
    tensors, offset = [], 300
    for i, n in enumerate(sizes):
        tensors.append(OutTensor(f"t{i}", "U8", (n,), source, offset))
        offset += n
    readers: list[int] = []
    real = digests_module.DirectWriter

    class Counting(real):  # type: ignore[misc, valid-type]
        def write(self, head: bytes, tensors: Any, *, start: int = 0) -> dict[str, str]:
            readers.append(len(tensors))
            return dict(super().write(head, tensors, start=start))

    monkeypatch.setattr(digests_module, "DirectWriter", Counting)
    progress: list[int] = []
    digests = hash_sources(tensors, {}, chunk=64 * KiB, buffers=4, progress=progress.append)
    assert len(readers) == (2 if split_min == 0 else 1) and sum(readers) == len(sizes)
    assert sum(progress) == sum(sizes)
    for t in tensors:
        assert digests[t.name] == hashlib.sha256(data[t.offset : t.offset + t.nbytes]).hexdigest()


def test_a_failing_second_reader_fails_the_pass(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from llamapro_cli.io import digests as digests_module

    monkeypatch.setattr(digests_module, "SPLIT_MIN", 0)
    monkeypatch.setattr(digests_module.os, "cpu_count", lambda: 2)
    source = tmp_path / "short.bin"
    source.write_bytes(bytes(4 * 64 * KiB))
    tensors = [
        OutTensor("a", "U8", (2 * 64 * KiB,), source, 0),
        OutTensor("b", "U8", (8 * 64 * KiB,), source, 2 * 64 * KiB),  # past the end of the file
    ]
    with pytest.raises(InputError, match="shorter than expected"):
        hash_sources(tensors, {}, chunk=64 * KiB, buffers=4, progress=None)
