"""Tests for `llamapro_cli.plan`: hand-written layouts, every refusal, and hypothesis invariants."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llamapro_cli.errors import UsageError
from llamapro_cli.plan import (
    ExpansionPlan,
    NewLayer,
    Placement,
    PlanKind,
    parse_after,
    plan_expansion,
)


def layout(plan: ExpansionPlan) -> list[str]:
    """Compact picture of a plan: "3" for original layer 3, "3'" for an identity copy of it."""
    return [f"{layer.source}'" if layer.identity else str(layer.source) for layer in plan.layers]


# --- the paper's recipe ---------------------------------------------------------------------------------


def test_llama2_7b_every_4_gives_40_layers() -> None:
    plan = plan_expansion(32, every=4)
    assert plan.num_layers_out == 40
    assert plan.new_indices == (4, 9, 14, 19, 24, 29, 34, 39)
    for j in plan.new_indices:
        # Each copy is a copy of the layer right before it, which is an original layer.
        before = plan.layers[j - 1]
        assert plan.layers[j].source == before.source and not before.identity
    assert [plan.layers[j].source for j in plan.new_indices] == [3, 7, 11, 15, 19, 23, 27, 31]
    assert plan.original_to_new[0] == 0 and plan.original_to_new[4] == 5 and plan.original_to_new[31] == 38
    assert plan.warnings == ()
    assert plan.to_record() == {
        "kind": "every",
        "every": 4,
        "copies": 1,
        "after": None,
        "add": None,
        "placement": None,
    }


# --- hand-written layouts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_layers", "every", "copies", "expected"),
    [
        (4, 4, 2, ["0", "1", "2", "3", "2'", "3'"]),
        (8, 4, 2, ["0", "1", "2", "3", "2'", "3'", "4", "5", "6", "7", "6'", "7'"]),
        (6, 2, None, ["0", "1", "1'", "2", "3", "3'", "4", "5", "5'"]),
        (3, 1, None, ["0", "0'", "1", "1'", "2", "2'"]),
        (3, 3, 3, ["0", "1", "2", "0'", "1'", "2'"]),
        (1, 1, 1, ["0", "0'"]),
    ],
)
def test_every_copies_by_hand(num_layers: int, every: int, copies: int | None, expected: list[str]) -> None:
    plan = plan_expansion(num_layers, every=every, copies=copies)
    assert layout(plan) == expected
    assert plan.kind is PlanKind.EVERY and plan.every == every and plan.copies == (copies or 1)
    assert plan.warnings == ()


def test_every_remainder_gets_no_copy_and_a_warning() -> None:
    plan = plan_expansion(10, every=4)
    assert layout(plan) == ["0", "1", "2", "3", "3'", "4", "5", "6", "7", "7'", "8", "9"]
    assert len(plan.warnings) == 1
    assert "layers 8-9" in plan.warnings[0] and "10" in plan.warnings[0]


def test_every_single_layer_remainder_names_it() -> None:
    plan = plan_expansion(9, every=4, copies=2)
    assert layout(plan)[-1] == "8" and plan.num_layers_out == 13
    assert len(plan.warnings) == 1 and "layer 8 " in plan.warnings[0]


def test_add_interleave_uneven_groups() -> None:
    # L=10, K=3: ends ceil(10/3)-1=3, ceil(20/3)-1=6, ceil(30/3)-1=9.
    plan = plan_expansion(10, add=3)
    assert [plan.layers[j].source for j in plan.new_indices] == [3, 6, 9]
    assert plan.new_indices == (4, 8, 12)
    assert plan.placement is Placement.INTERLEAVE and plan.warnings == ()


def test_add_interleave_ceil_group_ends() -> None:
    # L=30, K=7: ceil(30(g+1)/7) - 1 = 4, 8, 12, 17, 21, 25, 29 (floor would give 3, 7, ...).
    plan = plan_expansion(30, add=7)
    assert [plan.layers[j].source for j in plan.new_indices] == [4, 8, 12, 17, 21, 25, 29]


def test_add_top_layout() -> None:
    plan = plan_expansion(5, add=2, placement="top")
    assert layout(plan) == ["0", "1", "2", "3", "4", "3'", "4'"]
    assert plan.placement is Placement.TOP and plan.warnings == ()


def test_add_bottom_layout_and_warning() -> None:
    plan = plan_expansion(5, add=2, placement=Placement.BOTTOM)
    assert layout(plan) == ["0", "1", "0'", "1'", "2", "3", "4"]
    assert plan.new_indices == (2, 3)
    assert len(plan.warnings) == 1 and "bottom" in plan.warnings[0] and "harmful" in plan.warnings[0]
    assert plan.to_record()["placement"] == "bottom"


def test_after_repeats_and_unsorted_input() -> None:
    plan = plan_expansion(6, after=[4, 1, 4, 0])
    assert layout(plan) == ["0", "0'", "1", "1'", "2", "3", "4", "4'", "4'", "5"]
    assert plan.after == (0, 1, 4, 4)
    assert plan.to_record()["after"] == [0, 1, 4, 4]
    assert plan.kind is PlanKind.AFTER and plan.placement is None and plan.every is None


def test_after_last_layer() -> None:
    assert layout(plan_expansion(3, after=(2,))) == ["0", "1", "2", "2'"]


def test_explicit_interleave_is_allowed_with_every_and_after() -> None:
    assert plan_expansion(4, every=2, placement="interleave").num_layers_out == 6
    assert plan_expansion(4, after=[1], placement=Placement.INTERLEAVE).num_layers_out == 5


# --- equivalences (property tests) ----------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 16).flatmap(lambda k: st.tuples(st.just(k), st.integers(1, 12).map(lambda m: k * m))))
def test_add_equals_every_when_k_divides_l(k_and_l: tuple[int, int]) -> None:
    k, num_layers = k_and_l
    assert (
        plan_expansion(num_layers, add=k).layers == plan_expansion(num_layers, every=num_layers // k).layers
    )


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 96).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))))
def test_add_top_equals_every_l_copies_k(l_and_k: tuple[int, int]) -> None:
    num_layers, k = l_and_k
    top = plan_expansion(num_layers, add=k, placement="top")
    assert top.layers == plan_expansion(num_layers, every=num_layers, copies=k).layers


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 96).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))))
def test_add_interleave_spreads_one_copy_per_group(l_and_k: tuple[int, int]) -> None:
    num_layers, k = l_and_k
    plan = plan_expansion(num_layers, add=k)
    sources = [plan.layers[j].source for j in plan.new_indices]
    assert len(sources) == k and len(set(sources)) == k and sources[-1] == num_layers - 1
    # Groups are as even as integer division allows: sizes differ by at most one.
    sizes = [b - a for a, b in zip([-1, *sources], sources, strict=False)]
    assert max(sizes) - min(sizes) <= 1


# --- refusals -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_layers", "options", "needle"),
    [
        (0, {"every": 1}, "0 layers"),
        (-3, {"add": 1}, "-3 layers"),
        (32, {}, "choose one of"),
        (32, {"every": 4, "add": 8}, "--every and --add"),
        (32, {"every": 4, "after": [3]}, "--every and --after"),
        (32, {"after": [3], "add": 8}, "--after and --add"),
        (32, {"copies": 2}, "--copies"),
        (32, {"add": 4, "copies": 2}, "--copies"),
        (32, {"every": 4, "placement": "top"}, "--placement top"),
        (32, {"after": [1], "placement": Placement.BOTTOM}, "--placement bottom"),
        (32, {"add": 4, "placement": "middle"}, "'middle'"),
        (32, {"every": 0}, "--every 0 does not fit a checkpoint with 32 layers"),
        (32, {"every": -1}, "--every -1"),
        (32, {"every": 40}, "--every 40 does not fit a checkpoint with 32 layers"),
        (32, {"every": 4, "copies": 0}, "--copies 0 does not fit --every 4"),
        (32, {"every": 4, "copies": 5}, "--copies 5 does not fit --every 4"),
        (32, {"add": 0}, "--add 0 does not fit a checkpoint with 32 layers"),
        (32, {"add": 33}, "--add 33"),
        (32, {"add": 33, "placement": "top"}, "--add 33"),
        (32, {"add": 33, "placement": "bottom"}, "--add 33"),
        (32, {"after": []}, "at least one"),
        (32, {"after": [3, 32]}, "--after 32 is out of range for a checkpoint with 32 layers"),
        (32, {"after": [-1]}, "--after -1"),
    ],
)
def test_refusals_are_usage_errors(num_layers: int, options: dict[str, Any], needle: str) -> None:
    with pytest.raises(UsageError) as info:
        plan_expansion(num_layers, **options)
    err = info.value
    assert err.exit_code == 2
    assert needle in err.message
    assert "\n" not in err.message and err.hint is not None and "\n" not in err.hint


# --- parse_after ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("3,7,11", (3, 7, 11)), (" 11 , 3,7 ", (11, 3, 7)), ("5", (5,)), ("2,2", (2, 2)), ("-1", (-1,))],
)
def test_parse_after(text: str, expected: tuple[int, ...]) -> None:
    assert parse_after(text) == expected


@pytest.mark.parametrize("text", ["", "   ", "3,,7", "3,7,", "a", "3;7", "1.5", "1_0", "٣", "3 7", "+"])
def test_parse_after_refuses_junk(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_after(text)
    assert info.value.exit_code == 2 and info.value.hint is not None


@pytest.mark.parametrize("text", ["", "  "])
def test_parse_after_empty_says_so(text: str) -> None:
    with pytest.raises(UsageError, match="at least one layer index"):
        parse_after(text)


def test_parse_after_out_of_range_is_reported_by_the_plan() -> None:
    with pytest.raises(UsageError, match="--after -1 is out of range"):
        plan_expansion(8, after=parse_after("-1"))


# --- invariants of arbitrary valid plans ----------------------------------------------------------------


@st.composite
def valid_plans(draw: st.DrawFn) -> ExpansionPlan:
    num_layers = draw(st.integers(1, 80))
    kind = draw(st.sampled_from(list(PlanKind)))
    if kind is PlanKind.EVERY:
        every = draw(st.integers(1, num_layers))
        return plan_expansion(num_layers, every=every, copies=draw(st.none() | st.integers(1, every)))
    if kind is PlanKind.ADD:
        where = draw(st.sampled_from(list(Placement)))
        return plan_expansion(num_layers, add=draw(st.integers(1, num_layers)), placement=where)
    after = draw(st.lists(st.integers(0, num_layers - 1), min_size=1, max_size=20))
    return plan_expansion(num_layers, after=after)


@settings(max_examples=200, deadline=None)
@given(valid_plans())
def test_invariants(plan: ExpansionPlan) -> None:
    num_layers = plan.num_layers_in
    assert [layer.index for layer in plan.layers] == list(range(plan.num_layers_out))
    originals = [layer.source for layer in plan.layers if not layer.identity]
    assert originals == list(range(num_layers))
    seen: set[int] = set()
    for layer in plan.layers:
        if layer.identity:
            assert layer.source in seen  # a copy of an original placed earlier
        else:
            seen.add(layer.source)
    assert plan.num_layers_out == num_layers + len(plan.new_indices) > num_layers
    assert plan.new_indices == tuple(layer.index for layer in plan.layers if layer.identity)
    for source, index in plan.original_to_new.items():
        assert plan.layers[index] == NewLayer(index=index, source=source, identity=False)


@settings(max_examples=200, deadline=None)
@given(valid_plans())
def test_record_round_trip(plan: ExpansionPlan) -> None:
    # Through real JSON text, as llamapro.json stores it; warnings are not part of the record.
    record = json.loads(json.dumps({"plan": plan.to_record(), "layers": [asdict(x) for x in plan.layers]}))
    rebuilt = ExpansionPlan.from_layers(plan.num_layers_in, record["layers"], **record["plan"])
    assert rebuilt == replace(plan, warnings=())
    assert rebuilt.to_record() == plan.to_record()
    triples = [(x.index, x.source, x.identity) for x in plan.layers]
    assert ExpansionPlan.from_layers(plan.num_layers_in, triples, kind=plan.kind).layers == plan.layers
    assert (
        ExpansionPlan.from_layers(plan.num_layers_in, plan.layers, kind=plan.kind.value).layers == plan.layers
    )


# --- from_layers refusals -------------------------------------------------------------------------------

GOOD = [(0, 0, False), (1, 0, True), (2, 1, False)]


@pytest.mark.parametrize(
    ("num_layers", "layers", "record", "needle"),
    [
        (2, [(0, 0, False), (2, 0, True), (2, 1, False)], {}, "index 2"),
        (2, [(1, 0, False), (0, 0, True), (2, 1, False)], {}, "index 1"),
        (2, [(0, 1, False), (1, 0, False)], {}, "original layer 1"),
        (2, [(0, 0, False), (1, 0, False), (2, 1, False)], {}, "original layer 0"),
        (2, [(0, 0, False)], {}, "1 original layers, expected 2"),
        (2, [(0, 0, False), (1, 1, False), (2, 2, False)], {}, "original layer 2, outside 0..1"),
        (2, [(0, 0, False), (1, 5, True), (2, 1, False)], {}, "copy of layer 5"),
        (2, [(0, 0, False), (1, -1, True), (2, 1, False)], {}, "copy of layer -1"),
        (2, [(0, 0, True), (1, 0, False), (2, 1, False)], {}, "copy of layer 0"),
        (2, [(0, 0, False), (1, 1, True), (2, 1, False)], {}, "copy of layer 1"),
        (0, [], {}, "at least 1"),
        (True, GOOD, {}, "integer"),
        (2, [(0, 0, False), (1, 0, 1), (2, 1, False)], {}, "boolean"),
        (2, [(0, 0, False), (True, 0, True), (2, 1, False)], {}, "integers"),
        (2, [(0, 0, False), (1, "0", True), (2, 1, False)], {}, "integers"),
        (2, [(0, 0, False), (1, 0), (2, 1, False)], {}, "layers[1]"),
        (2, [(0, 0, False), "abc", (2, 1, False)], {}, "layers[1]"),
        (2, [{"index": 0, "source": 0}, (1, 0, True), (2, 1, False)], {}, "keys"),
        (2, GOOD, {"kind": "sometimes"}, "sometimes"),
        (2, GOOD, {"placement": "middle"}, "middle"),
        (2, GOOD, {"every": "4"}, "every"),
        (2, GOOD, {"add": 1.0}, "add"),
        (2, GOOD, {"after": "0"}, "after"),
        (2, GOOD, {"after": [0, None]}, "after"),
    ],
)
def test_from_layers_refuses_malformed(
    num_layers: int, layers: list[Any], record: dict[str, Any], needle: str
) -> None:
    options: dict[str, Any] = {"kind": "after", **record}
    with pytest.raises(ValueError) as info:
        ExpansionPlan.from_layers(num_layers, layers, **options)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_from_layers_accepts_the_good_example() -> None:
    plan = ExpansionPlan.from_layers(2, GOOD, kind="after", after=[0], placement=None)
    assert plan.new_indices == (1,) and plan.after == (0,) and plan.kind is PlanKind.AFTER


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ValueError, match="original layers"):
        ExpansionPlan(kind=PlanKind.AFTER, num_layers_in=3, layers=(NewLayer(0, 0, False),))


def test_plan_is_frozen() -> None:
    plan = plan_expansion(4, every=2)
    with pytest.raises(AttributeError):
        plan.every = 3  # type: ignore[misc]
