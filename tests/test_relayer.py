"""`llamapro relayer`: the layer-map SPEC, `layers` plans and their records, the byte surgery on the demo
checkpoint (repeat, drop, reorder, zeroed copies, `--drop-new` giving back the base byte for byte), the
refusals and exit codes, and what the readers (lineage, verify-identity, freeze-map, verify-frozen,
inspect) make of a relayered model. The families are checked against transformers in
`test_relayer_families.py`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from llamapro_cli.architectures.registry import family_for
from llamapro_cli.architectures.rewrite import rewrite_config
from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.cli.app import app
from llamapro_cli.errors import UsageError
from llamapro_cli.expand import expand
from llamapro_cli.layer_map import format_spec, identity_problem, parse_drop, parse_spec
from llamapro_cli.lineage import layer_mapping
from llamapro_cli.plan import ExpansionPlan, PlanKind, plan_expansion, plan_map
from llamapro_cli.provenance import Provenance, RecordError
from llamapro_cli.relayer import relayer

runner = CliRunner()


def run(*args: str | Path) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def tensors(path: Path) -> dict[str, bytes]:
    ckpt = Checkpoint.open(path)
    return {name: ckpt.read_bytes(name) for name in ckpt.tensor_names()}


def folder_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        digest.update(str(f.relative_to(path)).encode())
        if f.is_file():
            digest.update(f.read_bytes())
    return digest.hexdigest()


# --- the SPEC ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "n", "expected"),
    [
        ("0-2,1-3", 4, [(0, 0), (1, 0), (2, 0), (1, 0), (2, 0), (3, 0)]),
        (" 0 - 1 ,\t3 ", 4, [(0, 0), (1, 0), (3, 0)]),
        ("3z", 4, [(3, 1)]),
        ("0-1,0-1z", 2, [(0, 0), (1, 0), (0, 1), (1, 1)]),
        ("2 z,2Z", 3, [(2, 1), (2, 1)]),
        ("1,0", 2, [(1, 0), (0, 0)]),
        ("5-5", 6, [(5, 0)]),
    ],
)
def test_spec_lists_layers_in_output_order(text: str, n: int, expected: list[tuple[int, int]]) -> None:
    assert parse_spec(text, n) == tuple((s, bool(z)) for s, z in expected)


def test_solar_depth_up_scaling_of_32_layers_gives_48() -> None:
    entries = parse_spec("0-23,8-31", 32)
    assert [s for s, _ in entries] == [*range(24), *range(8, 32)] and not any(z for _, z in entries)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "needs at least one layer"),
        ("  ", "needs at least one layer"),
        ("0,,1", "an empty item"),
        ("0,", "an empty item"),
        ("a", "'a' is not a layer index"),
        ("1-", "'1-' is not a layer or a range"),
        ("-1", "'-1' is not a layer or a range"),
        ("0-1-2", "'1-2' is not a layer index"),
        ("1_0", "'1_0' is not a layer index"),
        ("١", "'١' is not a layer index"),
        ("3zz", "'3z' is not a layer index"),
        ("z", "'z' is not a layer or a range"),
        ("3-1", "the range 3-1 runs backwards"),
        ("0-4", "layer 4 is out of range for a checkpoint with 4 layers"),
        ("9" * 19, "a 19-digit number is out of range"),
    ],
)
def test_malformed_specs_are_one_line_usage_errors(text: str, needle: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_spec(text, 4)
    assert needle in info.value.message and "\n" not in info.value.message
    assert info.value.exit_code == 2 and info.value.hint


maps = st.integers(1, 12).flatmap(
    lambda n: st.tuples(st.just(n), st.lists(st.tuples(st.integers(0, n - 1), st.booleans()), min_size=1))
)


@settings(max_examples=200, deadline=None)
@given(maps)
def test_spec_round_trips_and_is_canonical(case: tuple[int, list[tuple[int, bool]]]) -> None:
    n, entries = case
    spec = format_spec(entries)
    assert parse_spec(spec, n) == tuple(entries)
    assert format_spec(parse_spec(spec.replace(",", " , "), n)) == spec
    plan = plan_map(n, entries)
    assert plan.spec == spec and plan.num_layers_out == len(entries)
    assert plan.is_identity_map == (identity_problem(entries, n) is None)


@pytest.mark.parametrize(
    ("text", "expected"), [("10,11", (10, 11)), ("11, 10,10", (10, 11)), ("3-5", (3, 4, 5))]
)
def test_drop_lists_layers_and_ranges(text: str, expected: tuple[int, ...]) -> None:
    assert parse_drop(text, 12) == expected


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("0-3", "would drop all 4 layers"),
        ("4", "out of range"),
        ("1z", "'1z' is not a layer index"),
        ("", "needs"),
    ],
)
def test_bad_drop_lists_are_usage_errors(text: str, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        parse_drop(text, 4)


# --- plans and records ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "identity", "problem"),
    [
        ("0-3", True, None),
        ("0-1,1z,2-3", True, None),
        ("0z,0-3,3z", True, None),
        ("0-2", False, "it drops layer 3"),
        ("0-3,1", False, "it repeats layer 1 unzeroed"),
        ("1,0,2-3", False, "it reorders layers"),
    ],
)
def test_identity_maps_keep_every_layer_once_in_order(spec: str, identity: bool, problem: str | None) -> None:
    entries = parse_spec(spec, 4)
    assert plan_map(4, entries).is_identity_map is identity
    assert identity_problem(entries, 4) == problem


def test_expand_plans_are_identity_maps_and_keep_their_records() -> None:
    plan = plan_expansion(8, every=4)
    assert plan.is_identity_map and plan.spec == "0-3,3z,4-7,7z"
    assert set(plan.to_record()) == {"kind", "every", "copies", "after", "add", "placement"}


def test_a_layers_record_rebuilds_its_plan_and_checks_its_spec() -> None:
    plan = plan_map(4, parse_spec("0-2,1-3", 4))
    record = plan.to_record()
    assert record == {"kind": "layers", "spec": "0-2,1-3"}
    assert ExpansionPlan.from_layers(4, plan.layers, **record) == plan
    with pytest.raises(ValueError, match="does not match its layers"):
        ExpansionPlan.from_layers(4, plan.layers, kind="layers", spec="0-3")
    with pytest.raises(ValueError, match=r"outside 0\.\.3"):
        ExpansionPlan.from_layers(4, [(0, 4, False)], kind="layers")


# --- the surgery on the demo checkpoint -------------------------------------------------------------------


@pytest.fixture(scope="module")
def pro(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo (4 layers, two shards) expanded --every 2: copies at 2 (of 1) and 5 (of 3)."""
    out = tmp_path_factory.mktemp("relayer") / "pro"
    expand(demo, out, every=2)
    return out


def test_each_output_layer_is_its_source_layers_bytes(demo: Path, tmp_path: Path) -> None:
    before = folder_digest(demo)
    result = run("relayer", "--in", demo, "--out", tmp_path / "out", "--layers", "3,0-2,1-2,2z")
    assert result.exit_code == 0, result.stderr
    assert "layer map      --layers 3,0-2,1-2,2z" in result.stdout and "dropped        -" in result.stdout
    assert "next: llamapro compare" in result.stderr
    src, out = tensors(demo), tensors(tmp_path / "out")
    sources = [3, 0, 1, 2, 1, 2, 2]
    prefix = "model.layers."
    rels = {n.split(".", 3)[3] for n in src if n.startswith(prefix)}
    for j, s in enumerate(sources):
        for rel in rels:
            got = out[f"{prefix}{j}.{rel}"]
            zeroed = j == 6 and rel in ("self_attn.o_proj.weight", "mlp.down_proj.weight")
            assert got == (bytes(len(got)) if zeroed else src[f"{prefix}{s}.{rel}"]), (j, rel)
    others = [n for n in src if not n.startswith(prefix)]
    assert all(out[n] == src[n] for n in others) and len(out) == len(others) + 7 * len(rels)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 7
    record = json.loads((tmp_path / "out" / "llamapro.json").read_text())
    assert record["schema_version"] == 2 and record["plan"] == {"kind": "layers", "spec": "3,0-2,1-2,2z"}
    assert [x["source"] for x in record["layers"]] == sources
    assert sorted(record["zeroed"]) == [
        "model.layers.6.mlp.down_proj.weight",
        "model.layers.6.self_attn.o_proj.weight",
    ]
    assert folder_digest(demo) == before  # the input is never modified


def test_drop_writes_every_layer_but_those(demo: Path, tmp_path: Path) -> None:
    result = run("relayer", "--in", demo, "--out", tmp_path / "out", "--drop", "1,2", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["plan"] == {"kind": "layers", "spec": "0,3"} and report["num_layers_out"] == 2
    src, out = tensors(demo), tensors(tmp_path / "out")
    assert out["model.layers.1.mlp.up_proj.weight"] == src["model.layers.3.mlp.up_proj.weight"]
    assert not any(n.startswith("model.layers.2.") for n in out)


def test_dry_run_prints_the_map_and_writes_nothing(demo: Path, tmp_path: Path) -> None:
    result = run("relayer", "--in", demo, "--out", tmp_path / "out", "--layers", "0-3,2-3", "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert "would write" in result.stdout and "repeated       2-3" in result.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("shard", ["5GB", "2MB"])
def test_drop_new_gives_back_the_base_byte_for_byte(
    demo: Path, pro: Path, tmp_path: Path, shard: str
) -> None:
    """Undo: the expansion's copies dropped, every tensor and every config value is the base's."""
    result = run("relayer", "--in", pro, "--out", tmp_path / "undo", "--drop-new", "--max-shard-size", shard)
    assert result.exit_code == 0, result.stderr
    assert tensors(tmp_path / "undo") == tensors(demo)
    assert json.loads((tmp_path / "undo" / "config.json").read_text()) == json.loads(
        (demo / "config.json").read_text()
    )
    record = Provenance.from_json(json.loads((tmp_path / "undo" / "llamapro.json").read_text()))
    assert record.plan.spec == "0-1,3-4" and record.parent is not None and record.parent.plan.kind == "every"
    # Only the layer count changed either way: no base values to record, no warning about them.
    assert record.config_replaced == () and record.parent.config_replaced == ()
    assert "config" not in result.stderr


def test_a_malformed_record_of_base_config_values_is_refused(pro: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(pro, bad)
    record = json.loads((bad / "llamapro.json").read_text())
    record["config_replaced"] = [{"path": [], "values": {"num_hidden_layers": 4}, "absent": "layer_types"}]
    (bad / "llamapro.json").write_text(json.dumps(record))
    before = folder_digest(bad)
    result = run("relayer", "--in", bad, "--out", tmp_path / "undo", "--drop-new")
    assert result.exit_code == 3, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "config_replaced[0].absent is not a list of distinct key names" in result.stderr
    assert not (tmp_path / "undo").exists() and folder_digest(bad) == before


def test_drop_new_undoes_only_the_latest_expansion(pro: Path, tmp_path: Path) -> None:
    expand(pro, tmp_path / "twice", after=[0])
    relayer(tmp_path / "twice", tmp_path / "once", drop_new=True)
    assert tensors(tmp_path / "once") == tensors(pro)


def test_drop_new_needs_a_record_that_added_layers(demo: Path, pro: Path, tmp_path: Path) -> None:
    result = run("relayer", "--in", demo, "--out", tmp_path / "a", "--drop-new")
    assert result.exit_code == 3 and "no llamapro.json" in result.stderr and "hint: " in result.stderr
    relayer(pro, tmp_path / "dus", layers="0-3,2-5")
    result = run("relayer", "--in", tmp_path / "dus", "--out", tmp_path / "b", "--drop-new")
    assert result.exit_code == 3 and "added no zeroed copy" in result.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "relayer needs a layer map"),
        (["--layers", "0", "--drop", "1"], "--layers and --drop conflict"),
        (["--drop", "1", "--drop-new"], "--drop and --drop-new conflict"),
        (["--layers", "0-4"], "layer 4 is out of range"),
        (["--layers", "0,x"], "'x' is not a layer index"),
        (["--drop", "0-3"], "would drop all 4 layers"),
    ],
)
def test_map_options_are_checked_before_anything_is_written(
    demo: Path, tmp_path: Path, args: list[str], needle: str
) -> None:
    result = run("relayer", "--in", demo, "--out", tmp_path / "out", *args)
    assert result.exit_code == 2, result.stderr
    assert needle in result.stderr and result.stderr.count("error: ") == 1
    assert list(tmp_path.iterdir()) == []


def test_output_rules_are_expands(demo: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    result = run("relayer", "--in", demo, "--out", tmp_path / "out", "--layers", "0-3", "--force")
    assert result.exit_code == 4 and (tmp_path / "out" / "mine.txt").read_text() == "keep"
    result = run("relayer", "--in", demo, "--out", demo / "inside", "--layers", "0-3")
    assert result.exit_code == 2 and not (demo / "inside").exists()


# --- expand --layers --------------------------------------------------------------------------------------


def test_expand_accepts_a_spec_only_when_it_is_an_identity_map(demo: Path, tmp_path: Path) -> None:
    result = run("expand", "--in", demo, "--out", tmp_path / "ok", "--layers", "0-1,1z,2-3")
    assert result.exit_code == 0, result.stderr
    expand(demo, tmp_path / "after", after=[1])
    assert tensors(tmp_path / "ok") == tensors(tmp_path / "after")
    record = json.loads((tmp_path / "ok" / "llamapro.json").read_text())
    assert record["plan"] == {"kind": "layers", "spec": "0-1,1z,2-3"}
    for spec, needle in [("0-2,1-3", "it repeats layers 1, 2 unzeroed"), ("0-3", "adds no layer")]:
        result = run("expand", "--in", demo, "--out", tmp_path / "no", "--layers", spec)
        assert result.exit_code == 2 and needle in result.stderr, result.stderr
    assert (
        "llamapro relayer" in run("expand", "--in", demo, "--out", tmp_path / "no", "--layers", "0,2").stderr
    )
    result = run("expand", "--in", demo, "--out", tmp_path / "no", "--layers", "0-3,3z", "--every", "2")
    assert result.exit_code == 2 and "--layers and --every conflict" in result.stderr
    assert not (tmp_path / "no").exists()


# --- what the readers make of it --------------------------------------------------------------------------


def test_verify_identity_refuses_a_map_that_is_not_an_identity(demo: Path, tmp_path: Path) -> None:
    relayer(demo, tmp_path / "dus", layers="0-2,1-3")
    result = run("verify-identity", "--out", tmp_path / "dus")
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and "is not an identity map (it repeats layers 1, 2" in lines[0]
    assert lines[1] == f"hint: measure how far apart they are: llamapro compare {demo} {tmp_path / 'dus'}"


def test_lineage_composes_an_expansion_and_a_map(demo: Path, pro: Path, tmp_path: Path) -> None:
    relayer(pro, tmp_path / "dus", layers="0-3,2-5")  # pro is 0,1,1z,2,3,3z
    mapping = layer_mapping(Checkpoint.open(tmp_path / "dus"), Checkpoint.open(demo))
    assert mapping.plan.kind is PlanKind.LAYERS and "2 expansions composed" in mapping.how
    assert mapping.plan.spec == "0-1,1z,2,1z,2-3,3z" and not mapping.plan.is_identity_map
    relayer(pro, tmp_path / "undo", drop_new=True)
    undo = layer_mapping(Checkpoint.open(tmp_path / "undo"), Checkpoint.open(demo)).plan
    assert undo.is_identity_map and undo.new_indices == ()


def test_freeze_map_trains_the_zeroed_copies_of_a_map(pro: Path, tmp_path: Path) -> None:
    relayer(pro, tmp_path / "z", layers="0-2,1z,3-5")  # 0 1 1z 1z' 2 3 3z
    result = run("freeze-map", tmp_path / "z", "--format", "json")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["new_layers"] == [3] and manifest["sources"] == [1]
    result = run("freeze-map", tmp_path / "z")
    assert "new layers       3<-1" in result.stdout
    assert "relayered from an earlier llamapro output" in result.stderr
    relayer(pro, tmp_path / "dus", layers="0-1,3-4,3-4")
    result = run("freeze-map", tmp_path / "dus")
    assert result.exit_code == 3 and "has no zeroed copy" in result.stderr


def test_verify_frozen_audits_a_relayered_model(demo_one_file: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    relayer(demo_one_file, tmp_path / "z", layers="0-3,1-2,2z", digests=True)
    state = load_file(tmp_path / "z" / "model.safetensors")
    state["model.layers.6.self_attn.o_proj.weight"] += 0.01
    (tmp_path / "trained").mkdir()
    shutil.copy(tmp_path / "z" / "config.json", tmp_path / "trained")
    save_file(state, tmp_path / "trained" / "model.safetensors", metadata={"format": "pt"})
    ok = run("verify-frozen", "--map", tmp_path / "z", "--trained", tmp_path / "trained")
    assert ok.exit_code == 0, ok.stderr
    state["model.layers.4.mlp.up_proj.weight"] += 0.01  # the repeat of layer 1: frozen
    save_file(state, tmp_path / "trained" / "model.safetensors", metadata={"format": "pt"})
    bad = run("verify-frozen", "--map", tmp_path / "z", "--trained", tmp_path / "trained")
    assert bad.exit_code == 1 and "model.layers.4.mlp.up_proj.weight" in bad.stdout + bad.stderr


def test_inspect_shows_the_map(pro: Path, tmp_path: Path) -> None:
    relayer(pro, tmp_path / "undo", drop_new=True)
    result = run("inspect", tmp_path / "undo")
    assert result.exit_code == 0 and "relayered from 6 layers" in result.stdout
    assert "(--layers 0-1,3-4); 2 generations deep" in result.stdout


def test_a_newer_record_schema_is_refused() -> None:
    with pytest.raises(RecordError, match="schema_version 3 is newer"):
        Provenance.from_json({"schema_version": 3})


# --- the config ------------------------------------------------------------------------------------------


def test_quantization_names_follow_their_layers_and_leave_with_dropped_ones() -> None:
    config = {
        "model_type": "llama",
        "num_hidden_layers": 4,
        "quantization_config": {
            "quant_method": "fp8",
            "modules_to_not_convert": ["model.layers.1.mlp.down_proj", "model.layers.2.self_attn", "lm_head"],
        },
    }
    plan = plan_map(4, parse_spec("0,2,2,3", 4))
    new, _ = rewrite_config(family_for(config), config, plan)
    assert new["quantization_config"]["modules_to_not_convert"] == [
        "model.layers.1.self_attn",
        "model.layers.2.self_attn",
        "lm_head",
    ]
    assert new["num_hidden_layers"] == 4 and config["num_hidden_layers"] == 4
