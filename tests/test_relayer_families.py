"""Layer maps on every family with per-layer config fields, against transformers (issue 17).

For each family a tiny model is relayered by the real `llamapro_cli.relayer.relayer` with a depth
up-scaling map (`0-3,2-5`: SOLAR's recipe in small), a drop-and-reorder map and a repeat map with a
zeroed copy; the output must load with no missing, unexpected or mismatched keys and compute exactly the
logits of the source model's own layers run by hand in the mapped order (`tiny_models.relayered_reference`:
deep copies of the loaded layers, no llamapro code involved), and its config's per-layer behaviour must
be its sources'. A config written the way mergekit writes it (the layer count alone) is caught by the same
oracle; maps a family's config cannot express are refused (exit 2) before anything is written.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import tiny_models as tm
import torch
from typer.testing import CliRunner

from llamapro_cli.architectures.layers import layer_kinds
from llamapro_cli.architectures.record import Family
from llamapro_cli.architectures.registry import family_for
from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.cli.app import app
from llamapro_cli.freeze.map import memory_name
from llamapro_cli.layer_map import parse_spec
from llamapro_cli.relayer import relayer

pytestmark = pytest.mark.hf
TinyModel = Callable[..., Path]

# Every family whose config has per-layer fields, with the legacy form (lists derived by formula) where
# that form is what hub configs carry.
CASES = [
    ("qwen2", "sliding"),
    ("qwen2", "sliding_legacy"),
    ("qwen2_moe", "default"),
    ("qwen2_moe", "legacy"),
    ("qwen3_moe", "default"),
    ("gemma2", "default"),
    ("gemma2", "legacy"),
    ("gemma3_text", "default"),
    ("gemma3_text", "legacy"),
    ("olmo3", "default"),
    ("cohere2", "default"),
    ("deepseek_v2", "default"),
    ("deepseek_v3", "default"),
    ("llama4_text", "default"),
    ("llama4_text", "legacy"),
    ("llama4", "default"),
    ("gpt_oss", "default"),
    ("qwen3_next", "default"),
    ("falcon_h1", "default"),
    ("bamba", "default"),
    ("lfm2", "default"),
    ("granitemoehybrid", "default"),
    ("nemotron_h", "default"),
    ("nemotron_h", "legacy"),
]
# On 6 layers. DeepSeek's dense layers (0, 1) must stay a prefix, so its zeroed copy is of layer 1.
MAPS = {"dus": "0-3,2-5", "drop": "0,1,5,3", "repeat": "0-2,1z,3-5,4"}
DEEPSEEK_REPEAT = "0-1,1z,2-5,4"


def _zeroed_in_memory(base: Path) -> Callable[[str], bool]:
    """Which block-relative in-memory parameter names hold a zeroed copy's zero tensors: the record's
    zero list applied to the checkpoint's names, carried to the names transformers loads them into
    (fused experts)."""
    ckpt = Checkpoint.open(base)
    fam = ckpt.family
    blocks, _ = ckpt.split_blocks()
    names = set()
    for index, rels in blocks.items():
        memory_prefix = memory_name(fam, f"{fam.layer_prefix}{index}.")
        for rel in rels:
            if fam.is_zeroed(rel):
                names.add(memory_name(fam, f"{fam.layer_prefix}{index}.{rel}")[len(memory_prefix) :])
    return names.__contains__


def _ids(base: Path, family: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    vocab = int(tm.read_config(base)["vocab_size"])
    return torch.randint(0, vocab, (2, tm.FAMILIES[family].seq_len), generator=gen)


@pytest.mark.parametrize(("family", "variant"), [pytest.param(f, v, id=f"{f}-{v}") for f, v in CASES])
def test_layer_maps_run_the_source_layers_in_the_mapped_order(
    tiny_model: TinyModel, tmp_path: Path, family: str, variant: str
) -> None:
    base = tiny_model(family, variant)
    ids = _ids(base, family)
    zero = _zeroed_in_memory(base)
    old = json.loads((base / "config.json").read_text())
    fam: Family = family_for(old)
    before = layer_kinds(fam, old)  # what inspect shows: attention type, dense/MoE, RoPE/NoPE, mixer
    maps = {**MAPS, "repeat": DEEPSEEK_REPEAT} if family.startswith("deepseek") else MAPS
    for name, spec in maps.items():
        out = tmp_path / name
        relayer(base, out, layers=spec)
        entries = parse_spec(spec, tm.num_layers(base))
        got = tm.forward_logits(tm.load_model(out), ids)  # strict: no missing or unexpected keys
        want = tm.forward_logits(tm.relayered_reference(base, entries, zero), ids)
        assert torch.equal(got, want), f"{name} ({spec}): max |Δ| {(got - want).abs().max().item():.3g}"
        after = layer_kinds(fam, json.loads((out / "config.json").read_text()))
        assert before is not None and after == [before[s] for s, _ in entries], name


@pytest.mark.parametrize(
    ("family", "variant", "spec"),
    [("gemma2", "legacy", "0-3,3-5"), ("qwen2", "sliding_legacy", "0-3,2-5")],  # a layer's kind moves
)
def test_a_config_with_only_the_layer_count_changed_runs_another_model(
    tiny_model: TinyModel, tmp_path: Path, family: str, variant: str, spec: str
) -> None:
    """What mergekit's passthrough writes (the count edited, nothing per layer) on a config whose kinds
    come from a formula: transformers derives them for the new indices, so a layer that moved to an index
    of another kind runs differently. The oracle sees it, so it would see such a mistake of ours too."""
    base = tiny_model(family, variant)
    out = tmp_path / "out"
    relayer(base, out, layers=spec)
    entries = parse_spec(spec, 6)
    config = json.loads((base / "config.json").read_text())
    assert "layer_types" not in config
    config["num_hidden_layers"] = len(entries)
    (out / "config.json").write_text(json.dumps(config))
    ids = _ids(base, family)
    got = tm.forward_logits(tm.load_model(out), ids)
    want = tm.forward_logits(tm.relayered_reference(base, entries, _zeroed_in_memory(base)), ids)
    assert not torch.equal(got, want)


@pytest.mark.parametrize(
    ("family", "spec", "needle"),
    [
        ("jamba", "0,1,3,5", "derives each layer's kind from the index"),  # kinds from period/offset
        ("deepseek_v3", "0-2,1z,3-5", "first_k_dense_replace needs the layers below a threshold"),
        ("deepseek_v3", "2-5,0-1", "first_k_dense_replace needs the layers below a threshold"),
    ],
)
def test_maps_a_config_cannot_express_are_refused_before_a_byte(
    tiny_model: TinyModel, tmp_path: Path, family: str, spec: str, needle: str
) -> None:
    base = tiny_model(family)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["relayer", "--in", str(base), "--out", str(out), "--layers", spec])
    assert result.exit_code == 2, result.stderr
    assert needle in result.stderr and result.stderr.startswith("error: ")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_index_dependent_families_are_refused(tiny_model: TinyModel, tmp_path: Path) -> None:
    """GPT-2 with scale_attn_by_inverse_layer_idx scales each layer by its index: refused (exit 3), as
    expand refuses it."""
    base = tiny_model("gpt2", "inverse_layer_idx")
    result = CliRunner().invoke(
        app, ["relayer", "--in", str(base), "--out", str(tmp_path / "out"), "--layers", "0-3,2-5"]
    )
    assert result.exit_code == 3, result.stderr
    assert "scale_attn_by_inverse_layer_idx" in result.stderr and not (tmp_path / "out").exists()


def _tensors(path: Path) -> dict[str, bytes]:
    ckpt = Checkpoint.open(path)
    return {name: ckpt.read_bytes(name) for name in ckpt.tensor_names()}


def _key_order(value: object) -> object:
    """Every object's keys in order, all the way down (dict equality ignores order)."""
    if isinstance(value, dict):
        return [(k, _key_order(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [_key_order(v) for v in value]
    return None


# Every family with per-layer fields, legacy forms included (lists left to a formula, Qwen-MoE's
# decoder_sparse_step set to 1 by the rewrite, Llama 4's text_config), plus a sharded Llama. Expanded
# with --every 2 unless the family needs otherwise; whole periods for Jamba's index arithmetic.
UNDO = [("llama", "sharded"), *CASES, ("llama4", "legacy"), ("jamba", "default")]
UNDO_PLANS: dict[str, dict[str, object]] = {
    "deepseek_v2": {"after": [1, 4]},  # the dense layers 0, 1 stay a prefix
    "deepseek_v3": {"after": [1, 4]},
    "jamba": {"every": 2, "copies": 2},
    "nemotron_h": {"every": 3},
}


def _expanded(tiny_model: TinyModel, tmp_path: Path, family: str, variant: str) -> tuple[Path, Path]:
    from llamapro_cli.expand import expand

    base = tiny_model(family, variant)
    plan = UNDO_PLANS.get(family, {"every": 2})
    expand(base, tmp_path / "pro", max_shard_size="100KB", **plan)  # type: ignore[arg-type]
    return base, tmp_path / "pro"


@pytest.mark.parametrize(("family", "variant"), [pytest.param(f, v, id=f"{f}-{v}") for f, v in UNDO])
def test_drop_new_undoes_an_expansion_byte_for_byte(
    tiny_model: TinyModel, tmp_path: Path, family: str, variant: str
) -> None:
    """Every tensor and the whole config.json come back: values, and key order at every depth, even
    where the base left per-layer fields to a formula and the expansion wrote them out."""
    base, pro = _expanded(tiny_model, tmp_path, family, variant)
    report = relayer(pro, tmp_path / "undo", drop_new=True)
    assert _tensors(tmp_path / "undo") == _tensors(base)
    old = json.loads((base / "config.json").read_text())
    new = json.loads((tmp_path / "undo" / "config.json").read_text())
    assert new == old
    assert _key_order(new) == _key_order(old)
    assert not any("config" in w for w in report.warnings), report.warnings
    expanded = json.loads((pro / "config.json").read_text())
    record = json.loads((pro / "llamapro.json").read_text())
    changed = {k for k in old.keys() | expanded.keys() if old.get(k) != expanded.get(k)}
    # Written only when the rewrite changed more than the layer count: llama records keep their v1 bytes.
    assert ("config_replaced" in record) == (changed - {"num_hidden_layers"} != set()), changed


def test_base_values_are_recorded_per_object_and_put_back_there(
    tiny_model: TinyModel, tmp_path: Path
) -> None:
    """A multimodal config: the per-layer fields live in text_config, the layer-indexed quantization
    names at the top level. Each object's replaced keys are recorded under its own path, and the undo
    gives back both objects exactly."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model("llama4", "legacy"), base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "modules_to_not_convert": ["language_model.model.layers.3.feed_forward.router", "vision_model"],
    }
    (base / "config.json").write_text(json.dumps(config, indent=2))
    from llamapro_cli.expand import expand

    expand(base, tmp_path / "pro", every=2)
    record = json.loads((tmp_path / "pro" / "llamapro.json").read_text())
    replaced = {tuple(entry["path"]): entry for entry in record["config_replaced"]}
    assert replaced[()] == {
        "path": [],
        "values": {"quantization_config": config["quantization_config"]},
        "absent": [],
    }
    assert set(replaced[("text_config",)]["absent"]) == {"layer_types", "no_rope_layers", "moe_layers"}
    relayer(tmp_path / "pro", tmp_path / "undo", drop_new=True)
    new = json.loads((tmp_path / "undo" / "config.json").read_text())
    assert new == config and _key_order(new) == _key_order(config)


def test_the_undo_map_spelled_out_gets_the_base_config_too(tiny_model: TinyModel, tmp_path: Path) -> None:
    """--drop or --layers naming exactly the copies the last run added is the same undo; a map that
    keeps one of them is another model, and its config keeps the explicit form."""
    base, pro = _expanded(tiny_model, tmp_path, "qwen2_moe", "legacy")  # 9 layers, copies at 2, 5, 8
    old = json.loads((base / "config.json").read_text())
    for name, option in (("drop", {"drop": "2,5,8"}), ("layers", {"layers": "0-1,3-4,6-7"})):
        relayer(pro, tmp_path / name, **option)  # type: ignore[arg-type]
        assert json.loads((tmp_path / name / "config.json").read_text()) == old, name
    report = relayer(pro, tmp_path / "other", drop="2,5")
    other = json.loads((tmp_path / "other" / "config.json").read_text())
    assert other["decoder_sparse_step"] == 1 and "layer_types" in other
    assert not any("config" in w for w in report.warnings)


def test_an_undo_of_a_record_without_base_values_keeps_the_explicit_form(
    tiny_model: TinyModel, tmp_path: Path
) -> None:
    """A record written before llamapro kept the base's values (no `config_replaced`) still undoes the
    expansion: same tensors, same per-layer behaviour, the lists the expansion wrote kept explicit, and a
    warning that says so."""
    base, pro = _expanded(tiny_model, tmp_path, "qwen2", "sliding_legacy")
    record = json.loads((pro / "llamapro.json").read_text())
    del record["config_replaced"]
    (pro / "llamapro.json").write_text(json.dumps(record, indent=2))
    result = CliRunner().invoke(
        app, ["relayer", "--in", str(pro), "--out", str(tmp_path / "u"), "--drop-new"]
    )
    assert result.exit_code == 0, result.stderr
    assert "does not record the base's config values" in result.stderr
    assert _tensors(tmp_path / "u") == _tensors(base)
    old = json.loads((base / "config.json").read_text())
    new = json.loads((tmp_path / "u" / "config.json").read_text())
    assert {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)} == {"layer_types"}
    fam = family_for(old)
    assert layer_kinds(fam, new) == layer_kinds(fam, old)


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: c.update(max_window_layers=2),  # a per-layer key edited after the expansion
        lambda c: c["layer_types"].reverse(),
    ],
)
def test_base_values_that_do_not_replay_to_the_config_are_not_put_back(
    tiny_model: TinyModel, tmp_path: Path, edit: Callable[[dict[str, object]], None]
) -> None:
    """The recorded values are put back only when the recorded expansion, replayed on them, gives this
    very config.json; otherwise the undo remaps the config as it stands, and says why."""
    _, pro = _expanded(tiny_model, tmp_path, "qwen2", "sliding_legacy")
    config = json.loads((pro / "config.json").read_text())
    edit(config)
    (pro / "config.json").write_text(json.dumps(config, indent=2))
    report = relayer(pro, tmp_path / "u", drop_new=True)
    assert any("do not give this config.json (edited since?)" in w for w in report.warnings)
    new = json.loads((tmp_path / "u" / "config.json").read_text())
    fam = family_for(new)
    keep = [j for j in range(len(config["layer_types"])) if j not in (2, 5, 8)]  # --every 2 on 6 layers
    assert layer_kinds(fam, new) == [layer_kinds(fam, config)[j] for j in keep]  # type: ignore[index]


def test_mtp_layers_move_to_just_after_the_new_last_layer(tiny_model: TinyModel, tmp_path: Path) -> None:
    """DeepSeek-V3's multi-token-prediction layer sits at index L: after a map of L' layers it is at L'
    (for a drop as for a repeat), and the blocks' own tensors do not pick it up."""
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(tiny_model("deepseek_v3"), base)
    state = load_file(base / "model.safetensors")
    mtp = {
        "model.layers.6.eh_proj.weight": torch.randn(64, 128),
        "model.layers.6.enorm.weight": torch.rand(64),
    }
    save_file({**state, **mtp}, base / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    for spec, n in (("0-3,5", 5), ("0-5,2-5", 10)):
        out = tmp_path / spec
        report = relayer(base, out, layers=spec)
        assert any("multi-token-prediction" in w for w in report.warnings)
        got = load_file(out / "model.safetensors")
        assert torch.equal(got[f"model.layers.{n}.eh_proj.weight"], mtp["model.layers.6.eh_proj.weight"])
        assert not any(k.startswith(f"model.layers.{n + 1}.") for k in got)
        assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == n
