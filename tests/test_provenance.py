"""`llamapro.json` is the contract between four commands: the typed record must read every v1 record
`expand` writes, write it back byte for byte, and refuse malformed ones with a reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llamapro_cli.config_replaced import put_back, replaced_keys
from llamapro_cli.expand import expand
from llamapro_cli.provenance import Provenance, RecordError


@pytest.fixture(scope="module")
def twice_expanded(tmp_path_factory: pytest.TempPathFactory, demo: Path) -> Path:
    root = tmp_path_factory.mktemp("prov")
    expand(demo, root / "once", every=2, digests=True)
    expand(root / "once", root / "twice", after=[0])
    return root / "twice"


def test_record_round_trips_byte_for_byte(twice_expanded: Path) -> None:
    for folder in (twice_expanded, twice_expanded.parent / "once"):
        text = (folder / "llamapro.json").read_text()
        record = Provenance.from_json(json.loads(text))
        assert json.dumps(record.to_json(), indent=2, ensure_ascii=False) + "\n" == text
        assert Provenance.from_json(record.to_json()) == record


def test_nested_generations_are_typed(twice_expanded: Path) -> None:
    record = Provenance.from_json(json.loads((twice_expanded / "llamapro.json").read_text()))
    generations = list(record.generations())
    assert len(generations) == 2
    assert generations[1].digests is not None and generations[1].digests.algorithm == "sha256"
    assert generations[0].digests is None
    assert generations[1].new_layers == (2, 5)
    assert record.expansion_plan().num_layers_in == generations[1].expansion_plan().num_layers_out


def _record(twice_expanded: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((twice_expanded / "llamapro.json").read_text())
    return doc


_ENTRY = {"path": [], "values": {"x": 1}, "absent": []}


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d.pop("schema_version"), "no schema_version"),
        (lambda d: d.update(layers="all"), "layers is not a list"),
        (lambda d: d["layers"][0].update(identity=1), "layers is not a list"),
        (lambda d: d["layers"][0].update(index=True), "layers is not a list"),
        (lambda d: d.update(source=[]), "source is not an object"),
        (lambda d: d["source"].update(num_layers="4"), "source.num_layers is not an integer"),
        (lambda d: d["plan"].update(kind=3), "plan.kind"),
        (lambda d: d["plan"].update(after=["1"]), "plan.after"),
        (lambda d: d.update(digests=[]), "digests or parent"),
        (lambda d: d["parent"].update(layers=None), "layers is not a list"),
        (lambda d: d.update(parent=5), "digests or parent"),
        (lambda d: d.update(zeroed="x"), "zeroed"),
        (lambda d: d.update(command=["rm"]), "command is not a string"),
        (lambda d: d.update(config_replaced={"path": []}), "config_replaced is not a list"),
        (lambda d: d.update(config_replaced=[[]]), r"config_replaced\[0\] is not an object of exactly"),
        (lambda d: d.update(config_replaced=[{**_ENTRY, "extra": 1}]), "is not an object of exactly"),
        (lambda d: d.update(config_replaced=[{**_ENTRY, "path": "text_config"}]), "path is not a list"),
        (lambda d: d.update(config_replaced=[{**_ENTRY, "values": [1]}]), "values is not an object"),
        (lambda d: d.update(config_replaced=[{**_ENTRY, "absent": [1]}]), "absent is not a list"),
        (lambda d: d.update(config_replaced=[{**_ENTRY, "absent": ["a", "a"]}]), "distinct key names"),
        (lambda d: d.update(config_replaced=[{**_ENTRY, "absent": ["x"]}]), "both in values and in absent"),
        (lambda d: d.update(config_replaced=[_ENTRY, _ENTRY]), "lists one path twice"),
        (lambda d: d["parent"].update(config_replaced=5), "config_replaced is not a list"),
    ],
)
def test_malformed_records_are_refused_with_the_reason(
    twice_expanded: Path, mutate: Any, reason: str
) -> None:
    doc = _record(twice_expanded)
    mutate(doc)
    with pytest.raises(RecordError, match=reason):
        Provenance.from_json(doc)


def test_unknown_keys_are_kept_on_rewrite(twice_expanded: Path) -> None:
    doc = _record(twice_expanded)
    doc["written_by_a_later_version"] = {"x": 1}
    assert Provenance.from_json(doc).to_json() == doc


def test_config_replaced_round_trips_and_sits_after_zeroed(twice_expanded: Path) -> None:
    """The base's replaced config values: typed, written back byte for byte, in their place in the record
    (omitted when the rewrite changed only the layer count, as on this Llama: the v1 bytes stay)."""
    doc = _record(twice_expanded)
    assert "config_replaced" not in doc
    entries = [
        {"path": [], "values": {"quantization_config": {"ignore": ["model.layers.1.mlp"]}}, "absent": []},
        {"path": ["text_config"], "values": {"max_window_layers": 3, "z": None}, "absent": ["layer_types"]},
    ]
    keys = list(doc)
    at = keys.index("zeroed") + 1
    doc = {k: doc[k] for k in keys[:at]} | {"config_replaced": entries} | {k: doc[k] for k in keys[at:]}
    record = Provenance.from_json(doc)
    assert record.config_replaced[1].path == ("text_config",)
    assert record.config_replaced[1].values == (("max_window_layers", 3), ("z", None))
    assert record.config_replaced[1].absent == ("layer_types",)
    assert json.dumps(record.to_json()) == json.dumps(doc)
    assert Provenance.from_json(record.to_json()) == record


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(-2, 2) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)
_objects = st.dictionaries(st.sampled_from("abcdefgh"), _values, max_size=6)


@settings(max_examples=200, derandomize=True, deadline=None)
@given(
    old=_objects,
    inner=_objects,
    edits=_objects,
    inner_edits=_objects,
    drop=st.sets(st.sampled_from("abcdefgh")),
)
def test_put_back_undoes_any_rewrite_but_the_count(
    old: dict[str, Any],
    inner: dict[str, Any],
    edits: dict[str, Any],
    inner_edits: dict[str, Any],
    drop: set[str],
) -> None:
    """Whatever a rewrite changes, adds or removes, at the top and in `text_config`: the recorded values
    put back give the original, key order included where no key was removed; only the count stays."""
    base = {**old, "text_config": {**inner, "n": 4}}
    new = {k: v for k, v in {**base, **edits}.items() if k not in drop}
    new["text_config"] = {
        k: v for k, v in {**base["text_config"], **inner_edits, "n": 6}.items() if k not in drop
    }
    replaced = replaced_keys(base, new, ("text_config",), "n")
    assert all(key != "n" for entry in replaced for key, _ in entry.values)
    back = put_back(new, replaced)
    assert back["text_config"].pop("n") == 6
    want = {**base, "text_config": {k: v for k, v in base["text_config"].items() if k != "n"}}
    assert json.dumps(back, sort_keys=True) == json.dumps(want, sort_keys=True)
    if not drop & set(base) and not drop & set(base["text_config"]):
        assert json.dumps(back) == json.dumps(want)  # key order too
