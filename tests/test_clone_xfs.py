"""The clone engine on a real copy-on-write filesystem: a loop-mounted XFS image (`mkfs.xfs -m reflink=1`).

`expand` there shares the input's blocks (FIEMAP shows the output's extents shared), writes exactly the
bytes the direct engine writes, says so in its report, loads in transformers with identical logits,
allocates only the written blocks, hashes each source range once for `--digests`, and stays independent
of its input: a later write into the output leaves the input's bytes and extents untouched. Skipped,
with the reason, where the image cannot be made (not root, no mkfs.xfs, no loop device)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.errors import OutputError
from llamapro_cli.expand import expand
from llamapro_cli.io.header import ALIGN, read_header

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_SHARED = 0x2000
_SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PATH": _SBIN})


@pytest.fixture(scope="session")
def xfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder on a fresh 1 GiB XFS image with reflink, loop-mounted for the session."""
    if os.geteuid() != 0:
        pytest.skip("mounting an XFS image needs root")
    if shutil.which("mkfs.xfs", path=_SBIN) is None:
        pytest.skip("mkfs.xfs is not installed (apt-get install xfsprogs)")
    base = tmp_path_factory.mktemp("xfs")
    image, mount = base / "xfs.img", base / "mnt"
    mount.mkdir()
    with image.open("wb") as f:
        f.truncate(1 << 30)  # sparse: only what XFS writes takes space
    made = _run("mkfs.xfs", "-q", "-m", "reflink=1", str(image))
    if made.returncode:
        pytest.skip(f"mkfs.xfs failed: {made.stderr.strip()[-200:]}")
    mounted = _run("mount", "-o", "loop", str(image), str(mount))
    if mounted.returncode:
        pytest.skip(f"cannot loop-mount the XFS image: {mounted.stderr.strip()[-200:]}")
    try:
        yield mount
    finally:
        if _run("umount", str(mount)).returncode:
            _run("umount", "-l", str(mount))
        image.unlink()


def _extents(path: Path) -> list[tuple[int, int, int, int]]:
    """(logical, physical, length, flags) of each extent of `path` (FS_IOC_FIEMAP, after a sync)."""
    count = 512
    request = struct.pack("=QQIIII", 0, (1 << 64) - 1, FIEMAP_FLAG_SYNC, 0, count, 0)
    buffer = bytearray(request + bytes(56 * count))
    with path.open("rb") as f:
        fcntl.ioctl(f.fileno(), FS_IOC_FIEMAP, buffer)
    (mapped,) = struct.unpack_from("=I", buffer, 20)
    return [struct.unpack_from("=QQQ16xI", buffer, 32 + 56 * i) for i in range(mapped)]


def _shared_bytes(path: Path) -> int:
    return sum(length for _, _, length, flags in _extents(path) if flags & FIEMAP_EXTENT_SHARED)


def _shard_payload(path: Path) -> tuple[dict[str, Any], bytes]:
    """A shard's header (the provenance hash, which holds a timestamp, blanked) and its data."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"]["llamapro_provenance_sha256"] = "-"
    return header, raw[8 + n :]


def _free(path: Path) -> int:
    os.sync()
    return shutil.disk_usage(path).free


@pytest.fixture(scope="session")
def llama_on_xfs(xfs: Path, tiny_model: Callable[..., Path]) -> Path:
    """The tiny llama (one file, so every copied run has the header's phase), copied onto the image."""
    dest = xfs / "llama-in"
    if not dest.exists():
        shutil.copytree(tiny_model("llama"), dest)
    return dest


@pytest.mark.hf
def test_expand_clones_the_input_and_writes_the_direct_engines_bytes(
    llama_on_xfs: Path, xfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tiny_models

    out, ref = xfs / "cloned", xfs / "direct"
    before = _free(xfs)
    report = expand(llama_on_xfs, out, every=2)
    allocated = before - _free(xfs)
    monkeypatch.setenv("LLAMAPRO_ENGINE", "direct")
    direct = expand(llama_on_xfs, ref, every=2)
    assert {s.engine for s in report.shards} == {"clone"}
    assert {s.engine for s in direct.shards} == {"direct"}
    for shard in report.shards:
        assert _shard_payload(out / shard.name) == _shard_payload(ref / shard.name)
        # Really shared: the whole blocks of the runs at the header's phase (tiny tensors of odd sizes
        # give each layer its own phase; test_write_shard_… below counts the blocks exactly).
        assert _shared_bytes(out / shard.name) >= 64 * ALIGN
    assert (out / "config.json").read_bytes() == (ref / "config.json").read_bytes()
    assert allocated < report.bytes_to_write  # only what is written takes new space
    tiny_models.assert_identical(llama_on_xfs, out, seq_len=12)


@pytest.mark.hf
def test_json_report_names_the_engine_of_each_shard(llama_on_xfs: Path, xfs: Path) -> None:
    out = xfs / "json"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "llamapro_cli", "expand", "--in", str(llama_on_xfs)),
            *("--out", str(out), "--every", "2", "--max-shard-size", "300KB", "--json"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    shards = json.loads(done.stdout)["shards"]
    assert len(shards) > 1 and {s["engine"] for s in shards} == {"clone"}
    shutil.rmtree(out)


@pytest.mark.hf
def test_a_later_write_into_the_output_never_reaches_the_input(llama_on_xfs: Path, xfs: Path) -> None:
    out = xfs / "cow"
    expand(llama_on_xfs, out, every=2)
    target = out / next(iter(Checkpoint.open(out).headers))
    logical, _, length, _ = next(e for e in _extents(target) if e[3] & FIEMAP_EXTENT_SHARED)
    inputs = sorted(llama_on_xfs.glob("*.safetensors"))
    extents_before = {p: _extents(p) for p in inputs}
    hashes_before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs}
    with target.open("r+b") as f:  # overwrite a shared block in the middle of a cloned run
        f.seek(logical + length // 2 // ALIGN * ALIGN)
        f.write(b"\xff" * ALIGN)
        os.fsync(f.fileno())
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs} == hashes_before
    assert {p: [e[:3] for e in _extents(p)] for p in inputs} == {
        p: [e[:3] for e in extents] for p, extents in extents_before.items()
    }
    shutil.rmtree(out)


@pytest.mark.hf
def test_digests_match_the_direct_engine_and_read_each_range_once(
    llama_on_xfs: Path, xfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llamapro_cli.io import digests as digests_module

    hashed: list[int] = []
    real = digests_module.DirectWriter

    class Counting(real):  # type: ignore[misc, valid-type]
        def write(self, head: bytes, tensors: Any) -> dict[str, str]:
            hashed.extend(t.nbytes for t in tensors)
            return dict(super().write(head, tensors))

    monkeypatch.setattr(digests_module, "DirectWriter", Counting)
    out, ref = xfs / "dig", xfs / "dig-direct"
    expand(llama_on_xfs, out, every=2, digests=True, max_shard_size="300KB")
    monkeypatch.setenv("LLAMAPRO_ENGINE", "direct")
    expand(llama_on_xfs, ref, every=2, digests=True, max_shard_size="300KB")
    cloned = json.loads((out / "llamapro.json").read_text())["digests"]
    assert cloned == json.loads((ref / "llamapro.json").read_text())["digests"]
    src = Checkpoint.open(llama_on_xfs)
    assert sum(hashed) == src.total_bytes()  # every input tensor once, the copies not again
    shutil.rmtree(out)
    shutil.rmtree(ref)


def test_forced_clone_across_filesystems_is_an_output_error(
    xfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo: Path
) -> None:
    if os.stat(demo).st_dev == os.stat(xfs).st_dev:
        pytest.skip("the demo checkpoint is on the XFS image itself")
    monkeypatch.setenv("LLAMAPRO_ENGINE", "clone")
    with pytest.raises(OutputError, match="by sharing extents with the input") as e:
        expand(demo, xfs / "across", every=2)
    assert e.value.exit_code == 4 and not (xfs / "across").exists()
    assert not list(xfs.glob("across.partial-*"))


def test_write_shard_clones_whole_blocks_and_allocates_the_rest(xfs: Path) -> None:
    from llamapro_cli.io.header import OutTensor
    from llamapro_cli.io.writer import Engine, write_shard

    source = xfs / "source.bin"
    source.write_bytes(os.urandom(300 + 64 * ALIGN))
    tensors = [
        OutTensor("a", "U8", (40 * ALIGN,), source, 300),
        OutTensor("zero", "U8", (16 * ALIGN,)),
        OutTensor("a.copy", "U8", (40 * ALIGN,), source, 300),
    ]
    out = xfs / "w.safetensors"
    written = write_shard(out, tensors, {"format": "pt"}, align=None, digests=True)
    assert written.engine is Engine.CLONE
    data = source.read_bytes()[300 : 300 + 40 * ALIGN]
    header = read_header(out)
    body = out.read_bytes()[header.data_offset :]
    assert body == data + bytes(16 * ALIGN) + data
    assert written.digests["a"] == written.digests["a.copy"] == hashlib.sha256(data).hexdigest()
    assert _shared_bytes(out) == 2 * 39 * ALIGN  # each copy's whole blocks
    assert out.stat().st_blocks * 512 <= 2 * 39 * ALIGN + 6 * ALIGN  # + header, run ends; zeros a hole
    out.unlink()


def _sharded_block_sized(dest: Path) -> Path:
    """A two-shard llama whose tensors are whole 4 KiB blocks (as a real model's are: hidden size 1024
    in float32), the two shards' headers of different lengths: two block phases, as on the hub."""
    import torch
    from safetensors.torch import save_file

    h, layers = 1024, 2
    gen = torch.Generator().manual_seed(0)
    names = [("model.embed_tokens.weight", (8, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        names += [(p + f"self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
        names += [(p + f"mlp.{x}_proj.weight", (h, h)) for x in ("gate", "up", "down")]
        names += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    names += [("model.norm.weight", (h,)), ("lm_head.weight", (8, h))]
    tensors = {n: torch.randn(shape, generator=gen) for n, shape in names}
    dest.mkdir()
    split = len(names) // 2
    parts = {
        "model-00001-of-00002.safetensors": names[:split],
        "model-00002-of-00002.safetensors": names[split:],
    }
    for fname, part in parts.items():
        meta = {"format": "pt", "padding": "x" * (100 if fname.startswith("model-00001") else 1000)}
        save_file({n: tensors[n] for n, _ in part}, str(dest / fname), metadata=meta)
    index = {
        "metadata": {"total_size": 0},
        "weight_map": {n: f for f, part in parts.items() for n, _ in part},
    }
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
        "intermediate_size": h, "num_hidden_layers": layers, "num_attention_heads": 8,
        "num_key_value_heads": 8, "vocab_size": 8, "torch_dtype": "float32",
    }  # fmt: skip
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_a_sharded_input_is_shared_block_for_block(xfs: Path) -> None:
    # Each output shard holds one input shard's tensors (and their copies), so all of its data keeps
    # that source's block phase: everything copied is shared, only the header's block is written.
    src = _sharded_block_sized(xfs / "sharded-in")
    phases = {read_header(p).data_offset % ALIGN for p in src.glob("*.safetensors")}
    assert len(phases) == 2  # the case a mixed output shard could not clone
    out = xfs / "sharded-out"
    report = expand(src, out, every=1, max_shard_size="10MB")
    assert {s.engine for s in report.shards} == {"clone"} and len(report.shards) >= 4
    sources = Checkpoint.open(src)
    copied = shared = unshared = count = 0
    for shard in report.shards:
        path = out / shard.name
        names = [n for n in read_header(path).tensors if _copied(n, report)]
        assert len({sources.location(_source_name(n, report))[0] for n in names}) == 1, shard.name
        copied += sum(read_header(path).tensors[n].nbytes for n in names)
        shared += _shared_bytes(path)
        unshared += path.stat().st_blocks * 512 - _shared_bytes(path)
        count += len(names)
    # Written: at most the two partial blocks at the ends of each copied tensor (run ends are fewer).
    assert shared >= copied - 2 * ALIGN * count and unshared <= 2 * ALIGN * count, (copied, shared, unshared)
    assert unshared < copied // 50
    shutil.rmtree(out)
    shutil.rmtree(src)


def _copied(name: str, report: Any) -> bool:
    """Not a zeroed branch-final tensor of a new layer."""
    new = {layer.index for layer in report.layers if layer.identity}
    parts = name.split(".")
    return not (len(parts) > 3 and int(parts[2]) in new and parts[-2] in ("o_proj", "down_proj"))


def _source_name(name: str, report: Any) -> str:
    """The input tensor an output tensor copies."""
    parts = name.split(".")
    if name.startswith("model.layers."):
        parts[2] = str(next(layer.source for layer in report.layers if layer.index == int(parts[2])))
    return ".".join(parts)
