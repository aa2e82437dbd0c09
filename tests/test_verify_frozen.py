"""verify-frozen and freeze-map must never approve training of an original layer: every frozen tensor is
compared to its last byte (whatever the chunking), the trained folder is read as transformers loads it,
and neither a record nor a manifest is trusted before it is checked against the weights.

Built on the demo checkpoint (bf16 Llama, 4 layers) expanded --every 2: new layers 2 and 5 of 6. No
transformers needed.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from llamapro_cli.cli.app import app
from llamapro_cli.cli.console import to_jsonable
from llamapro_cli.errors import InputError, LlamaproError
from llamapro_cli.expand import expand
from llamapro_cli.freeze.apply import freeze_map_from
from llamapro_cli.freeze.audit import verify_frozen
from llamapro_cli.freeze.manifest import load_manifest
from llamapro_cli.freeze.map import freeze_map
from llamapro_cli.io import ranges

runner = CliRunner()
NEW = (2, 5)
ORIGINAL = (0, 1, 3, 4)
RELS = [
    "input_layernorm.weight", "mlp.down_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "post_attention_layernorm.weight", "self_attn.k_proj.weight", "self_attn.o_proj.weight",
    "self_attn.q_proj.weight", "self_attn.v_proj.weight",
]  # fmt: skip
# Every frozen tensor of the expansion, each class of tensor in every original layer, and the non-blocks.
FROZEN = [f"model.layers.{i}.{rel}" for i in ORIGINAL for rel in RELS]
FROZEN += ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]


@pytest.fixture(scope="module")
def pro(demo_one_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("verify-frozen")
    expand(demo_one_file, root / "digests", every=2, digests=True)
    expand(demo_one_file, root / "plain", every=2)
    expand(demo_one_file, root / "sharded", every=2, max_shard_size="2MB")
    return {"digests": root / "digests", "plain": root / "plain", "sharded": root / "sharded"}


def trained(src: Path, dst: Path) -> Path:
    """A 'trained' copy: the new layers' o_proj moved (they were zero), everything else as expanded."""
    state = load_file(src / "model.safetensors")
    for i in NEW:
        state[f"model.layers.{i}.self_attn.o_proj.weight"] += 0.01
    dst.mkdir(parents=True, exist_ok=True)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def poke(path: Path, name: str, *, at: int = -1) -> None:
    """Flip one bit of byte `at` of tensor `name` (default: the high byte of its last element)."""
    with path.open("r+b") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        begin, end = json.loads(f.read(size))[name]["data_offsets"]
        f.seek(8 + size + (end + at if at < 0 else begin + at))
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x01]))


def test_the_parametrised_names_are_every_frozen_tensor(pro: dict[str, Path]) -> None:
    fm = freeze_map(pro["digests"])
    assert fm.new_layers == NEW and sorted(fm.frozen) == sorted(FROZEN)


@pytest.fixture(scope="module")
def one_trained(pro: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained(pro["digests"], tmp_path_factory.mktemp("one") / "t")


@pytest.mark.parametrize("ref", ["digests", "plain"])
@pytest.mark.parametrize("name", FROZEN)
def test_a_change_to_the_last_element_of_any_frozen_tensor_fails(
    pro: dict[str, Path], one_trained: Path, name: str, ref: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every frozen tensor class is compared (no name is skipped), to its last element, across chunk
    boundaries (4 KiB chunks: every matrix spans several), against digests and against bytes."""
    monkeypatch.setattr(ranges, "CHUNK", 4096)
    weights = one_trained / "model.safetensors"
    poke(weights, name)
    try:
        report = verify_frozen(pro[ref], one_trained)
    finally:
        poke(weights, name)  # the same bit back: the shared trained copy is clean again
    assert not report.ok
    assert [c.name for c in report.changed] == [name] and report.changed[0].reason == "values differ"


@pytest.mark.parametrize("ref", ["digests", "plain"])
def test_a_retyped_copy_is_compared_to_its_last_element(
    pro: dict[str, Path], tmp_path: Path, ref: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp32 copies (trainers upcast) are converted back chunk by chunk: the last chunk counts too."""
    monkeypatch.setattr(ranges, "CHUNK", 4096)
    state = {
        k: v.float() for k, v in load_file(trained(pro[ref], tmp_path / "bf16") / "model.safetensors").items()
    }
    (tmp_path / "f32").mkdir()
    save_file(state, tmp_path / "f32" / "model.safetensors")
    assert verify_frozen(pro[ref], tmp_path / "f32").ok
    state["model.embed_tokens.weight"][-1, -1] = 2.0  # representable in bf16: a real change
    save_file(state, tmp_path / "f32" / "model.safetensors")
    report = verify_frozen(pro[ref], tmp_path / "f32")
    assert [c.name for c in report.changed] == ["model.embed_tokens.weight"]
    assert "compared after converting F32 to BF16" in report.changed[0].reason


# --- the trained folder is read as transformers loads it -------------------------------------------------


def test_a_fresh_single_file_beside_a_stale_index_is_refused(pro: dict[str, Path], tmp_path: Path) -> None:
    """transformers loads model.safetensors and ignores the index: auditing the index's (stale, unchanged)
    shards would pass a changed frozen tensor. The ambiguous folder is refused; the file alone audits."""
    folder = shutil.copytree(pro["sharded"], tmp_path / "run")
    trained(pro["digests"], folder)  # the fresh save beside the stale index and shards
    poke(folder / "model.safetensors", "model.layers.1.self_attn.k_proj.weight")
    result = runner.invoke(app, ["verify-frozen", "--map", str(pro["digests"]), "--trained", str(folder)])
    assert result.exit_code == 3, result.stdout
    assert "both model.safetensors and model.safetensors.index.json" in result.stderr
    assert "hint: remove the stale one" in result.stderr
    alone = runner.invoke(
        app, ["verify-frozen", "--map", str(pro["digests"]), "--trained", str(folder / "model.safetensors")]
    )
    assert alone.exit_code == 1 and "changed: model.layers.1.self_attn.k_proj.weight" in alone.stdout


def test_the_file_config_names_is_the_one_audited(pro: dict[str, Path], tmp_path: Path) -> None:
    """config.json's transformers_weights makes transformers load that file instead of the usual names."""
    folder = trained(pro["digests"], tmp_path / "run")
    os.rename(folder / "model.safetensors", folder / "final.safetensors")
    trained(pro["digests"], tmp_path / "other")
    shutil.copy(tmp_path / "other" / "model.safetensors", folder / "unused.safetensors")
    poke(folder / "final.safetensors", "model.norm.weight")
    (folder / "config.json").write_text(json.dumps({"transformers_weights": "final.safetensors"}))
    report = verify_frozen(pro["digests"], folder)
    assert report.trained_files == 1 and [c.name for c in report.changed] == ["model.norm.weight"]
    for bad in ("../x.safetensors", "missing.safetensors", "config.json", 5):
        (folder / "config.json").write_text(json.dumps({"transformers_weights": bad}))
        with pytest.raises(InputError, match="transformers_weights"):
            verify_frozen(pro["digests"], folder)


def test_an_adapter_folder_says_merge_first(pro: dict[str, Path], tmp_path: Path) -> None:
    """A PEFT adapter holds LoRA matrices only: one error with the merge command, not a line per tensor."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    lora = {"base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight": torch.zeros(4, 256)}
    save_file(lora, folder / "adapter_model.safetensors")
    for target in (folder, folder / "adapter_model.safetensors"):
        result = runner.invoke(app, ["verify-frozen", "--map", str(pro["digests"]), "--trained", str(target)])
        assert result.exit_code == 3, result.stdout
        assert "a PEFT adapter (LoRA weights only), not the trained model: merge it first" in result.stderr
        assert "merge_and_unload()" in result.stderr and "missing" not in result.stdout


def test_lora_matrices_on_a_frozen_layer_fail(pro: dict[str, Path], tmp_path: Path) -> None:
    """Unmerged LoRA weights saved beside the model adapt their target at load time: on an original layer
    that is a changed frozen tensor, whatever the base weight's bytes say."""
    folder = trained(pro["digests"], tmp_path / "t")
    state = load_file(folder / "model.safetensors")
    state["model.layers.1.mlp.up_proj.lora_A.default.weight"] = torch.ones(4, 256)
    state["model.layers.2.mlp.up_proj.lora_A.default.weight"] = torch.ones(4, 256)  # a new layer: fine
    save_file(state, folder / "model.safetensors")
    report = verify_frozen(pro["digests"], folder)
    assert [c.name for c in report.changed] == ["model.layers.1.mlp.up_proj.weight"]
    assert "LoRA adapter" in report.changed[0].reason


# --- a record or a manifest is checked against the weights before it is trusted -------------------------


def lying_record(folder: Path) -> None:
    """Rewrite llamapro.json to claim original layer 1 is the copy (as a consistent --after 0,3 plan)."""
    record = json.loads((folder / "llamapro.json").read_text())
    record["plan"] = {"kind": "after", "every": None, "copies": None, "after": [0, 3], "add": None,
                      "placement": None}  # fmt: skip
    record["layers"] = [
        {"index": 0, "source": 0, "identity": False}, {"index": 1, "source": 0, "identity": True},
        {"index": 2, "source": 1, "identity": False}, {"index": 3, "source": 2, "identity": False},
        {"index": 4, "source": 3, "identity": False}, {"index": 5, "source": 3, "identity": True},
    ]  # fmt: skip
    (folder / "llamapro.json").write_text(json.dumps(record))


@pytest.mark.parametrize("ref", ["digests", "plain"])
def test_a_record_claiming_an_original_layer_is_new_is_refused(
    pro: dict[str, Path], tmp_path: Path, ref: str
) -> None:
    folder = shutil.copytree(pro[ref], tmp_path / "pro")
    lying_record(folder)
    result = runner.invoke(app, ["freeze-map", str(folder)])
    assert result.exit_code == 3 and result.stdout == ""
    assert "says layer 1 is a new (zero-initialised) layer, but model.layers.1." in result.stderr
    trained_run = trained(pro[ref], tmp_path / "t")
    poke(trained_run / "model.safetensors", "model.layers.1.mlp.up_proj.weight")  # "training" layer 1
    check = runner.invoke(app, ["verify-frozen", "--map", str(folder), "--trained", str(trained_run)])
    assert check.exit_code == 3, check.stdout


def manifest(folder: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], object] | None = None) -> Path:
    doc = json.loads(json.dumps(to_jsonable(freeze_map(folder))))
    if edit is not None:
        edit(doc)
    path = tmp_path / "map.json"
    path.write_text(json.dumps(doc))
    return path


def claim_layer_1(doc: dict[str, Any]) -> None:
    """A consistent manifest (counts, lists, parameters) that makes original layer 1 trainable."""
    move = [k for k in doc["frozen"] if k.startswith("model.layers.1.")]
    doc["new_layers"], doc["sources"] = [1, 2, 5], None
    doc["trainable"] += move
    doc["frozen"] = [k for k in doc["frozen"] if k not in move]
    for side in ("trainable", "frozen"):
        doc[f"{side}_parameters"] = list(dict.fromkeys(doc["tensors"][k]["parameter"] for k in doc[side]))
        doc[f"{side}_tensors"] = len(doc[side])
        doc[f"{side}_numel"] = sum(_numel(doc["tensors"][k]["shape"]) for k in doc[side])


def _numel(shape: list[int]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


@pytest.mark.parametrize("ref", ["digests", "plain"])
def test_a_manifest_claiming_an_original_layer_is_new_is_refused(
    pro: dict[str, Path], tmp_path: Path, ref: str
) -> None:
    path = manifest(pro[ref], tmp_path, claim_layer_1)
    assert load_manifest(path).new_layers == (1, 2, 5)  # well-formed: only the weights can refute it
    trained_run = trained(pro[ref], tmp_path / "t")
    poke(trained_run / "model.safetensors", "model.layers.1.mlp.up_proj.weight")
    result = runner.invoke(app, ["verify-frozen", "--map", str(path), "--trained", str(trained_run)])
    assert result.exit_code == 3, result.stdout
    assert "says layer 1 is a new (zero-initialised) layer" in result.stderr


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node: Any = doc
        for key in parents:
            node = node[int(key) if isinstance(node, list) else key]
        node[int(last) if isinstance(node, list) else last] = value

    return edit


def _drop_tensor(doc: dict[str, Any]) -> None:
    """Leave a frozen tensor out everywhere, counts adjusted: the audit would never look at it."""
    name = "model.layers.1.mlp.up_proj.weight"
    doc["frozen"].remove(name)
    doc["frozen_tensors"] -= 1
    doc["frozen_numel"] -= _numel(doc["tensors"].pop(name)["shape"])
    doc["frozen_parameters"].remove(name)


MALFORMED: dict[str, Callable[[dict[str, Any]], object]] = {
    "tensors is a list": _set("tensors", []),
    "tensors is empty": _set("tensors", {}),
    "a shape holds Infinity": _set("tensors/model.norm.weight/shape", [float("inf")]),
    "a shape holds a float": _set("tensors/model.norm.weight/shape", [256.0]),
    "a shape holds true": _set("tensors/model.norm.weight/shape", [True]),
    "a negative dimension": _set("tensors/model.norm.weight/shape", [-1]),
    "a 400-digit dimension": _set("tensors/model.norm.weight/shape", [10**400]),
    "an unknown dtype": _set("tensors/model.norm.weight/dtype", "F128"),
    "a digest that is not hex": _set("tensors/model.norm.weight/sha256", "zz"),
    "a new layer out of range": _set("new_layers", [2, 99]),
    "a new layer as a string": _set("new_layers", ["2", 5]),
    "num_layers NaN": _set("num_layers", float("nan")),
    "trainable lists a frozen tensor": lambda d: d["trainable"].append("model.norm.weight"),
    "a count that does not add up": _set("frozen_tensors", 1),
    "sizes that do not add up": _set("trainable_numel", 1),
    "an unknown role": _set("also", ["everything"]),
    "an unknown architecture": _set("architecture", "gpt9"),
    "another layer prefix": _set("layer_prefix", "x."),
    "md5 digests": _set("digest_algorithm", "md5"),
    "half the digests": _set("tensors/model.norm.weight/sha256", None),
    "a tensor left out everywhere": _drop_tensor,
    "no tensors key": lambda d: d.pop("tensors"),
    "the whole document a list": lambda d: d.clear(),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_manifest_is_one_line_exit_3(pro: dict[str, Path], tmp_path: Path, case: str) -> None:
    path = manifest(pro["digests"], tmp_path, MALFORMED[case])
    trained_run = trained(pro["digests"], tmp_path / "t")
    poke(trained_run / "model.safetensors", "model.layers.1.mlp.up_proj.weight")
    result = runner.invoke(app, ["verify-frozen", "--map", str(path), "--trained", str(trained_run)])
    assert result.exit_code == 3, (result.exit_code, result.stdout, result.stderr)
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) <= 2


def test_manifests_that_are_not_json_files(pro: dict[str, Path], tmp_path: Path) -> None:
    trained_run = trained(pro["digests"], tmp_path / "t")
    huge = tmp_path / "huge.json"
    with huge.open("wb") as f:
        f.truncate(200 * 1024 * 1024)  # sparse: a hostile size without the disk space
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    (tmp_path / "bad.json").write_bytes(b'{"kind": "llamapro freeze-map", "schema_version": 1e400')
    for path, words in ((huge, "larger than"), (fifo, "not a regular file"), (tmp_path / "bad.json", "JSON")):
        with pytest.raises(InputError, match=words):
            verify_frozen(path, trained_run)


def test_every_valid_manifest_reads_back_equal(pro: dict[str, Path], tmp_path: Path) -> None:
    for ref in ("digests", "plain", "sharded"):
        for also in ((), ("embeddings", "head", "final-norm")):
            fm = freeze_map(pro[ref], also=also)
            assert load_manifest(json.loads(json.dumps(to_jsonable(fm)))) == fm


# --- freeze-map on a trainer's saved checkpoint ------------------------------------------------------------


def saved_by_trainer(pro: Path, dst: Path) -> Path:
    """What a trainer saves: config.json and the weights, no llamapro.json, new layers no longer zero."""
    folder = trained(pro, dst)
    shutil.copy(pro / "config.json", folder / "config.json")
    return folder


def test_freeze_map_of_a_trained_checkpoint_takes_the_new_layers_from_map(
    pro: dict[str, Path], tmp_path: Path
) -> None:
    folder = saved_by_trainer(pro["digests"], tmp_path / "run")
    alone = runner.invoke(app, ["freeze-map", str(folder)])
    assert alone.exit_code == 3 and "no new layers found" in alone.stderr
    assert "--map" in alone.stderr.split("hint:")[1]
    doc = manifest(pro["digests"], tmp_path)
    for reference in (str(pro["digests"]), str(doc)):
        result = runner.invoke(app, ["freeze-map", str(folder), "--map", reference, "--format", "json"])
        assert result.exit_code == 0, result.stderr
        fm = load_manifest(json.loads(result.stdout))
        assert fm.new_layers == NEW and fm.checkpoint == str(folder) and fm.digest_algorithm is None
        assert "(--map)" in fm.found_by
    axolotl = runner.invoke(app, ["freeze-map", str(folder), "--map", str(doc), "--format", "axolotl"])
    assert axolotl.exit_code == 0 and "  - model.layers.5.\n" in axolotl.stdout
    roles = runner.invoke(app, ["freeze-map", str(folder), "--map", str(doc), "--also", "head"])
    assert roles.exit_code == 2 and "a manifest records its roles" in roles.stderr


def test_freeze_map_from_refuses_another_model(pro: dict[str, Path], demo: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"not the model the map .* describes"):
        freeze_map_from(demo, pro["digests"])  # the 4-layer base is not the 6-layer expansion
    folder = saved_by_trainer(pro["digests"], tmp_path / "run")
    state = load_file(folder / "model.safetensors")
    state["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(InputError, match=r"model\.layers\.0\.extra\.weight is in this checkpoint only"):
        freeze_map_from(folder, pro["digests"])


# --- the next: line -----------------------------------------------------------------------------------


def test_next_line_is_pasteable_and_offers_only_usable_formats(demo: Path, tmp_path: Path) -> None:
    expand(demo, tmp_path / "every2", every=2)  # 6 layers, new 2 and 5: llama-factory's stride fits
    expand(demo, tmp_path / "after", after=[0])  # 5 layers, new 1: stride 5 would train layer 4
    fits = runner.invoke(app, ["freeze-map", str(tmp_path / "every2")])
    assert f"next: llamapro freeze-map {tmp_path / 'every2'} --format axolotl  (or " in fits.stderr
    assert "llama-factory" in fits.stderr and "|" not in fits.stderr
    refused = runner.invoke(app, ["freeze-map", str(tmp_path / "after")])
    line = next(x for x in refused.stderr.splitlines() if x.startswith("next: "))
    assert "llama-factory" not in line and "|" not in line
    spaced = shutil.copytree(tmp_path / "after", tmp_path / "a b")
    quoted = runner.invoke(app, ["freeze-map", str(spaced)])
    assert f"freeze-map '{spaced}' --format" in quoted.stderr


def test_verify_frozen_never_passes_what_it_did_not_read(pro: dict[str, Path], tmp_path: Path) -> None:
    """An unreadable trained folder is an error, never a PASS."""
    with pytest.raises(LlamaproError):
        verify_frozen(pro["digests"], tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no safetensors files"):
        verify_frozen(pro["digests"], tmp_path / "empty")
