"""verify-identity sees every difference it exists to see, including those only one of its checks can see.

A false IDENTICAL is the worst failure this product can have, so each test here plants one difference that
a plausible bug in the verifier would miss, and asserts DIFFERENT: bytes outside the layers that no input
token reaches (only the structural check sees them), a config key both sides set but with other values, a
divergence that shows only in cached decoding or only in the greedy tokens, and a near miss (|Δ logit|
6e-5) that any tolerance would pass. `make mutate` plants the corresponding bugs and expects these to fail.
"""

from __future__ import annotations

import os

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # see test_verify.py

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_verify import cli, copy_of, edit_tensor

from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.demo import write_demo_checkpoint
from llamapro_cli.expand import expand
from llamapro_cli.verify.identity import verify_identity
from llamapro_cli.verify.inputs import make_inputs
from llamapro_cli.verify.numerics import Outputs, compare_outputs

UNUSED_ROW = 1023  # an embedding row the default input (seed 0, 32 tokens) never uses; checked below


@pytest.fixture(scope="session")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The demo checkpoint (bf16, untied head) and `expand --every 4` of it. Read-only."""
    root = tmp_path_factory.mktemp("sensitivity")
    write_demo_checkpoint(root / "base", layers=8)
    expand(root / "base", root / "pro", every=4)
    return root / "base", root / "pro"


# --- tensors outside the layers: the structural check compares their bytes ----------------------------


def _set_row(t: Any) -> Any:
    t = t.clone()
    t[UNUSED_ROW] = 0.5
    return t


def _set_first(t: Any) -> Any:
    t = t.clone()
    t.view(-1)[0] = t.view(-1)[0] + 1
    return t


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("model.embed_tokens.weight", _set_row),
        ("model.norm.weight", _set_first),
        ("lm_head.weight", _set_row),
    ],
)
def test_changed_tensor_outside_the_layers_is_named(
    pair: tuple[Path, Path], tmp_path: Path, name: str, change: Any
) -> None:
    bad = copy_of(pair[1], tmp_path)
    edit_tensor(bad, name, change)
    report = verify_identity(bad, numerical=False)
    assert report.verdict == "different" and report.structural is not None
    assert (report.structural.tensor, report.structural.layer) == (name, None)
    assert report.reason == f"outside the layers: {name} differs from {name} in the base"


def test_embedding_row_no_input_uses_is_seen_by_the_structural_check_alone(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """The numerical check feeds a few dozen tokens: a changed embedding row of any other token leaves
    every logit as it was, so only the byte comparison of non-block tensors can report it."""
    base, out = pair
    inputs = make_inputs(
        Checkpoint.open(base),
        Checkpoint.open(out),
        device="cpu",
        tokens=None,
        seed=0,
        prompt=None,
        decode_steps=8,
        warnings=[],
    )
    assert UNUSED_ROW not in inputs.ids
    bad = copy_of(out, tmp_path)
    edit_tensor(bad, "model.embed_tokens.weight", _set_row)
    numbers_only = verify_identity(bad, engine="native", structural=False)
    assert numbers_only.verdict == "identical"  # what a verifier without the byte check would say
    result = cli("--out", bad, "--engine", "native")
    assert result.exit_code == 1
    assert result.stdout.startswith("verdict: DIFFERENT: outside the layers: model.embed_tokens.weight")


def test_last_element_of_a_multi_chunk_copy_is_checked(
    pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Zeros are tested chunk by chunk (16 MiB): a copy's zeroed tensor must be zero up to its last
    element, not only in its first chunk (lowered here, so a small tensor spans many chunks)."""
    from llamapro_cli import lineage

    bad = copy_of(pair[1], tmp_path)
    name = "model.layers.4.self_attn.o_proj.weight"  # the copy of base layer 3

    def last(t: Any) -> Any:
        t = t.clone()
        t.view(-1)[-1] = 1e-3
        return t

    edit_tensor(bad, name, last)
    monkeypatch.setattr(lineage, "CHUNK", 4096 + 6)  # many chunks, the last one short
    report = verify_identity(bad, numerical=False)
    assert report.verdict == "different" and report.structural is not None
    assert report.structural.tensor == name and report.reason == (
        f"layer 4 is an identity copy of base layer 3, but its {name} is not all zero"
    )


# --- config.json: keys both sides set are compared ------------------------------------------------------


def _with_rope_parameters(src: Path, dest: Path) -> Path:
    """The demo with `rope_parameters` written out (as transformers 5 saves it) instead of `rope_theta`."""
    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": config.pop("rope_theta")}
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest


def test_shared_config_key_with_another_value_is_named(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """Dynamic NTK scaling acts only past max_position_embeddings, where no affordable numerical check
    goes: with `rope_parameters` in both configs, only the comparison of shared keys sees the switch."""
    base = _with_rope_parameters(pair[0], tmp_path / "base")
    expand(base, tmp_path / "pro", every=4)
    assert verify_identity(tmp_path / "pro", numerical=False).verdict == "identical"
    config = json.loads((tmp_path / "pro" / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 8.0, "rope_theta": 10000.0}
    (tmp_path / "pro" / "config.json").write_text(json.dumps(config, indent=2))
    report = verify_identity(tmp_path / "pro")
    assert report.verdict == "different" and report.engine is None  # decided before any model runs
    assert report.structural is not None and report.structural.tensor == "config.json:rope_parameters"
    assert report.reason is not None and "'dynamic'" in report.reason and "'default'" in report.reason


# --- the numerical verdict: every pass counts ---------------------------------------------------------


def _outputs(seed: int = 0) -> Outputs:
    import torch

    gen = torch.Generator().manual_seed(seed)
    full = torch.randn(1, 6, 10, generator=gen)
    return Outputs(full=full, cached=full.clone(), greedy=torch.tensor([[3, 1, 4]]))


def test_cached_only_divergence_is_different() -> None:
    reference, got = _outputs(), _outputs()
    got.cached[0, 4, 7] += 1e-6
    result = compare_outputs(reference, got, 0.0)
    assert result.full_max_abs == 0.0 and result.tokens_equal
    assert result.cached_max_abs is not None and 0 < result.cached_max_abs < 1e-5
    assert not result.identical(0.0) and result.position == 4
    assert result.divergence is not None and result.divergence.startswith(
        "cached-decoding logits differ from position 4"
    )
    assert result.identical(1e-5)  # within a tolerance the user chose, it is


def test_greedy_only_divergence_is_different() -> None:
    reference, got = _outputs(), _outputs()
    got.greedy[0, 2] = 5
    result = compare_outputs(reference, got, 0.0)
    assert (result.full_max_abs, result.cached_max_abs, result.tokens_equal) == (0.0, 0.0, False)
    assert not result.identical(0.0) and not result.identical(1e9)
    assert result.divergence == "greedy token 2 after the sequence differs" and result.position == 6 + 2


def test_nan_on_one_side_only_is_different() -> None:
    reference, got = _outputs(), _outputs()
    got.full[0, 2, 5] = float("nan")
    result = compare_outputs(reference, got, 1e9)  # no tolerance accepts it
    assert not result.identical(1e9) and result.position == 2
    assert result.full_max_abs is not None and result.full_max_abs > 1e300  # the largest float: valid JSON
    reference.full[0, 2, 5] = float("nan")  # NaN where both have it: the same output
    assert compare_outputs(reference, got, 0.0).identical(0.0)


@pytest.mark.hf
def test_cached_only_divergence_makes_the_verdict_different(
    pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end: the transformers engine's expanded outputs differ in one cached logit only."""
    from llamapro_cli.verify import hf_engine

    real = hf_engine.hf_outputs

    def nudged(root: Path, *args: Any) -> Any:
        outputs, problems = real(root, *args)
        if root == pair[1]:
            cached = outputs.cached.clone()
            cached[0, -1, 0] += 1.0
            outputs = replace(outputs, cached=cached)
        return outputs, problems

    monkeypatch.setattr(hf_engine, "hf_outputs", nudged)
    report = verify_identity(pair[1], engine="transformers", structural=False)
    assert (report.full_max_abs, report.greedy_tokens_equal) == (0.0, True)
    assert report.verdict == "different" and report.cached_max_abs is not None and report.cached_max_abs > 0
    assert report.reason is not None and "cached-decoding logits differ" in report.reason
    assert report.hint is not None and "outputs do not" in report.hint


# --- near misses: exact means exact ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def near_miss(pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy whose o_proj is 1e-6 everywhere instead of 0: logits move by 6e-5 in float32."""
    import torch

    bad = copy_of(pair[1], tmp_path_factory.mktemp("near-miss"))
    edit_tensor(bad, "model.layers.4.self_attn.o_proj.weight", lambda t: torch.full_like(t, 1e-6))
    return bad


@pytest.mark.parametrize("engine", ["native", pytest.param("transformers", marks=pytest.mark.hf)])
def test_near_miss_is_different(near_miss: Path, engine: str) -> None:
    report = verify_identity(near_miss, engine=engine, dtype="float32", structural=False)
    assert report.verdict == "different"
    assert report.full_max_abs is not None and 0 < report.full_max_abs < 1e-3  # a tolerance would pass it
    if engine == "native":
        assert report.first_divergence_layer == 4
    relaxed = verify_identity(near_miss, engine=engine, dtype="float32", structural=False, atol=1e-3)
    assert relaxed.verdict == "identical"  # --atol is the only way to accept it
    assert verify_identity(near_miss, numerical=False).structural.tensor == (  # type: ignore[union-attr]
        "model.layers.4.self_attn.o_proj.weight"
    )
