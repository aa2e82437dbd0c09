"""`expand` against the transformers oracle, and its file-level contract.

Every core family/variant is expanded with our real `expand`, reloaded by transformers (no missing,
unexpected or mismatched keys) and compared with `torch.equal` on full and cached logits and greedy
tokens. Byte-level checks prove originals and copies are byte ranges of the input and zeroed tensors
are all-zero bytes; the config, provenance, shards, carry-over and atomic-output rules are checked.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tiny_models
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.cli.app import app
from llamapro_cli.errors import OutputError, UsageError
from llamapro_cli.expand import expand
from llamapro_cli.io.header import read_header

CORE_VARIANTS = tiny_models.all_variants(tiny_models.CORE_FAMILIES)
PLANS: dict[str, dict[str, Any]] = {
    "every2": {"every": 2},
    "every3-copies2": {"every": 3, "copies": 2},
    "after-0-2-2-5": {"after": [0, 2, 2, 5]},
    "add2-top": {"add": 2, "placement": "top"},
    "add2-bottom": {"add": 2, "placement": "bottom"},
}


def _expand_to(tmp_path: Path, src: Path, **plan: Any) -> Path:
    out = tmp_path / "out"
    expand(src, out, **plan)
    return out


@pytest.mark.hf
@pytest.mark.parametrize(("family", "variant"), CORE_VARIANTS)
def test_every_core_variant_is_exact(
    tiny_model: Callable[..., Path], tmp_path: Path, family: str, variant: str
) -> None:
    src = tiny_model(family, variant)
    out = _expand_to(tmp_path, src, every=2)
    tiny_models.assert_identical(src, out, seq_len=12)


@pytest.mark.hf
@pytest.mark.parametrize("plan", [p for p in PLANS if p != "every2"])
@pytest.mark.parametrize(("family", "variant"), [("qwen2", "sliding_legacy"), ("llama", "bias")])
def test_every_plan_kind_is_exact(
    tiny_model: Callable[..., Path], tmp_path: Path, family: str, variant: str, plan: str
) -> None:
    src = tiny_model(family, variant)
    out = _expand_to(tmp_path, src, **PLANS[plan])
    tiny_models.assert_identical(src, out, seq_len=12)


@pytest.mark.hf
def test_bf16_input_stays_bf16_and_exact(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    import torch

    src = tiny_model("qwen3", "sliding", dtype="bfloat16")
    out = _expand_to(tmp_path, src, after=[1, 4])
    dtypes = {t.dtype for h in Checkpoint.open(out).headers.values() for t in h.tensors.values()}
    assert dtypes == {"BF16"}
    tiny_models.assert_identical(src, out, seq_len=12, dtype=torch.bfloat16)


def _tensor_bytes(ckpt: Checkpoint, name: str) -> bytes:
    path, offset = ckpt.location(name)
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(ckpt.info(name).nbytes)


@pytest.mark.hf
def test_bytes_are_copies_or_zeros(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    src_dir = tiny_model("llama", "sharded")
    out_dir = _expand_to(tmp_path, src_dir, every=3, copies=2, max_shard_size="300KB")
    src, out = Checkpoint.open(src_dir), Checkpoint.open(out_dir)
    record = json.loads((out_dir / "llamapro.json").read_text())
    zeroed = set(record["zeroed"])
    assert zeroed and len(out.weight_map) == len(src.weight_map) + 4 * 9
    sources = {x["index"]: x["source"] for x in record["layers"]}
    for name in out.weight_map:
        data = _tensor_bytes(out, name)
        if name in zeroed:
            assert data == bytes(len(data)), name
            assert name.endswith(("o_proj.weight", "down_proj.weight"))
            continue
        parts = name.split(".")
        if name.startswith("model.layers."):
            parts[2] = str(sources[int(parts[2])])
        assert data == _tensor_bytes(src, ".".join(parts)), name


@pytest.mark.hf
def test_config_is_edited_not_rewritten(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    src = tiny_model("qwen2", "sliding_legacy")
    out = _expand_to(tmp_path, src, after=[1, 4])
    old = json.loads((src / "config.json").read_text())
    new = json.loads((out / "config.json").read_text())
    assert "layer_types" not in old
    # max_window_layers 3: layers 0-2 full, 3-5 sliding; copies after 1 and 4.
    expected = ["full_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 4
    assert new["layer_types"] == expected
    assert new["max_window_layers"] == 4 and new["num_hidden_layers"] == 8
    changed = {k for k in new if old.get(k) != new[k]}
    assert changed == {"layer_types", "max_window_layers", "num_hidden_layers"}
    assert list(new)[: len(old)] == list(old)  # key order kept


@pytest.mark.hf
def test_provenance_record_schema(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    src = tiny_model("llama")
    out = _expand_to(tmp_path, src, every=3)
    record = json.loads((out / "llamapro.json").read_text())
    assert record["schema_version"] == 1
    assert record["source"]["path"] == str(src.resolve())
    assert record["source"]["num_layers"] == 6 and record["num_layers"] == 8
    digest = hashlib.sha256((src / "config.json").read_bytes()).hexdigest()
    assert record["source"]["config_sha256"] == digest
    assert record["plan"] == {
        "kind": "every",
        "every": 3,
        "copies": 1,
        "after": None,
        "add": None,
        "placement": None,
    }
    assert [x for x in record["layers"] if x["identity"]] == [
        {"index": 3, "source": 2, "identity": True},
        {"index": 7, "source": 5, "identity": True},
    ]
    assert record["layer_prefix"] == "model.layers." and record["parent"] is None
    assert record["digests"] is None
    meta = read_header(out / "model.safetensors").metadata
    assert meta["format"] == "pt" and meta["llamapro_version"]
    again = tmp_path / "again"
    expand(out, again, after=[0])
    nested = json.loads((again / "llamapro.json").read_text())
    assert nested["parent"] == record and nested["num_layers"] == 9


@pytest.mark.hf
def test_shards_and_index(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    src = tiny_model("llama")
    out = _expand_to(tmp_path, src, every=2, max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    ckpt = Checkpoint.open(out)
    assert index["metadata"]["total_size"] == sum(ckpt.info(n).nbytes for n in ckpt.weight_map)
    single = tmp_path / "single"
    expand(src, single, every=2)
    assert not (single / "model.safetensors.index.json").exists()
    assert (single / "model.safetensors").exists()


def test_carry_over_and_not_copied(tmp_path: Path) -> None:
    from llamapro_cli.demo import write_demo_checkpoint

    src = write_demo_checkpoint(tmp_path / "src", layers=4)
    (src / "tokenizer.json").write_text("{}")
    (src / "LICENSE").write_text("license")
    (src / "pytorch_model.bin").write_bytes(b"not a pickle")
    (src / "original").mkdir()
    (src / "modeling_custom.py").write_text("raise SystemExit")
    result = CliRunner().invoke(
        app, ["expand", "--every", "2", "--in", str(src), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "o"
    for name in ("tokenizer.json", "LICENSE", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    card = (out / "README.md").read_text()  # the model card replaces the input README, keeping its text
    assert "block-expansion" in card and (src / "README.md").read_text().strip().splitlines()[-1] in card
    for name in ("pytorch_model.bin", "original", "modeling_custom.py"):
        assert not (out / name).exists()
        assert name in result.stderr
    assert "not copied" in result.stderr


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    from llamapro_cli.demo import write_demo_checkpoint

    src = write_demo_checkpoint(tmp_path / "src", layers=8)
    out = tmp_path / "o"
    result = CliRunner().invoke(
        app, ["expand", "--every", "4", "--in", str(src), "--out", str(out), "--dry-run"]
    )
    assert result.exit_code == 0, result.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert "identity copy" in result.stdout and "free space" in result.stdout
    # Two input shards, two output shards: a shard never mixes two sources (their block phases differ).
    assert "model-00001-of-00002.safetensors" in result.stdout
    assert "model-00002-of-00002.safetensors" in result.stdout
    doc = json.loads(
        CliRunner()
        .invoke(app, ["expand", "--every", "4", "--in", str(src), "--out", str(out), "--dry-run", "--json"])
        .stdout
    )
    assert doc["dry_run"] and doc["num_layers_out"] == 10 and doc["free_space"] > 0
    assert [x["index"] for x in doc["layers"] if x["identity"]] == [4, 9]


def test_existing_out_and_force(tmp_path: Path) -> None:
    from llamapro_cli.demo import write_demo_checkpoint

    src = write_demo_checkpoint(tmp_path / "src", layers=4)
    out = tmp_path / "o"
    expand(src, out, every=2)
    with pytest.raises(OutputError):
        expand(src, out, every=4)
    expand(src, out, every=4, force=True)
    assert json.loads((out / "llamapro.json").read_text())["num_layers"] == 5
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(OutputError):
        expand(src, foreign, every=2, force=True)
    assert (foreign / "keep.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    expand(src, empty, every=2, force=True)
    assert (empty / "llamapro.json").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_plan_errors_are_usage_errors(tmp_path: Path) -> None:
    from llamapro_cli.demo import write_demo_checkpoint

    src = write_demo_checkpoint(tmp_path / "src", layers=4)
    for args in (["--every", "0"], ["--every", "5"], ["--after", "4"], ["--every", "2", "--copies", "3"]):
        result = CliRunner().invoke(app, ["expand", *args, "--in", str(src), "--out", str(tmp_path / "o")])
        assert result.exit_code == 2, (args, result.stderr)
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
        assert not (tmp_path / "o").exists()
    with pytest.raises(UsageError):
        expand(src, src / "inside", every=2)
    with pytest.raises(UsageError):
        expand(src, tmp_path, every=2)


def test_input_untouched(tmp_path: Path) -> None:
    from llamapro_cli.demo import write_demo_checkpoint

    src = write_demo_checkpoint(tmp_path / "src", layers=4)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in src.iterdir()}
    expand(src, tmp_path / "o", every=2, digests=True)
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in src.iterdir()}
    assert before == after


def test_symlinked_input_gives_real_files(tmp_path: Path) -> None:
    # Links that stay inside the folder (here into a hidden store, as the hub cache links into blobs/)
    # are followed; the output holds real files. Links out of the folder are refused (test_faults).
    from llamapro_cli.demo import write_demo_checkpoint

    linked = tmp_path / "linked"
    real = write_demo_checkpoint(linked / ".store", layers=4)
    for p in real.iterdir():
        (linked / p.name).symlink_to(Path(".store", p.name))
    expand(linked, tmp_path / "o", every=2)
    assert not any(p.is_symlink() for p in (tmp_path / "o").iterdir())
    assert (tmp_path / "o" / "generation_config.json").read_bytes() == (
        real / "generation_config.json"
    ).read_bytes()
    shutil.rmtree(tmp_path / "o")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["a", "b", "c", None]), st.integers(1, 50)), min_size=1, max_size=40),
    st.integers(1, 120),
)
def test_shards_never_mix_sources_and_keep_the_order(
    items: list[tuple[str | None, int]], max_shard: int
) -> None:
    # One source file per output shard (its block phase is the shard's), each group in output order,
    # cut at max_shard (a larger tensor alone); zero tensors ride with the tensor before them.
    from llamapro_cli.io.header import OutTensor
    from llamapro_cli.shards import split_shards

    tensors = [
        OutTensor(f"t{i}", "U8", (n,), None if s is None else Path(s), 0) for i, (s, n) in enumerate(items)
    ]
    shards = split_shards(tensors, max_shard)
    flat = [t for _, ts in shards for t in ts]
    assert sorted(t.name for t in flat) == sorted(t.name for t in tensors)
    names = [name for name, _ in shards]
    n = len(shards)
    assert names == (
        ["model.safetensors"]
        if n == 1
        else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    )
    group: dict[str, Path | None] = {}
    current = next((t.source for t in tensors if t.source is not None), None)
    for t in tensors:
        current = t.source or current
        group[t.name] = current
    for _, ts in shards:
        assert len({group[t.name] for t in ts}) == 1
        assert len(ts) == 1 or sum(t.nbytes for t in ts) <= max_shard
    position = {t.name: i for i, t in enumerate(tensors)}
    for source in set(group.values()):
        in_group = [position[t.name] for t in flat if group[t.name] == source]
        assert in_group == sorted(in_group)
