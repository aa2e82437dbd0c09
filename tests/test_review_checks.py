"""Regression tests for false passes found by reviewing the checking side (verify-identity, verify-frozen)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from llamapro_cli.expand import expand
from llamapro_cli.verify.identity import verify_identity

ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta")


def _legacy_base(tiny_model: Callable[..., Path], dest: Path) -> Path:
    """A tiny Llama whose config.json leaves RoPE to the defaults (as hand-written hub configs do)."""
    base = shutil.copytree(tiny_model("llama"), dest)
    config = json.loads((base / "config.json").read_text())
    for key in ROPE_KEYS:
        config.pop(key, None)
    (base / "config.json").write_text(json.dumps(config, indent=2))
    return base


@pytest.mark.hf
def test_key_added_to_the_expanded_config_only_is_named(
    tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    """Dynamic NTK scaling only acts past max_position_embeddings, so no affordable numerical check sees
    it: the structural check must, although the base config has no such key to compare it with."""
    base = _legacy_base(tiny_model, tmp_path / "base")
    expand(base, tmp_path / "pro", every=2)
    config = json.loads((tmp_path / "pro" / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 8.0, "rope_theta": 10000.0}
    (tmp_path / "pro" / "config.json").write_text(json.dumps(config, indent=2))
    report = verify_identity(tmp_path / "pro", base=base, numerical=False)
    assert report.verdict == "different"
    assert report.structural is not None and report.structural.tensor == "config.json:rope_parameters"
    assert "rope_parameters" in (report.reason or "") and "dynamic" in (report.reason or "")


@pytest.mark.hf
def test_transformers_round_trip_of_the_config_still_verifies(
    tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    """Other tools save the expanded config through transformers, which writes every default (here the
    RoPE settings the base leaves out): keys on one side only are equal when transformers reads them so."""
    from transformers import AutoConfig

    base = _legacy_base(tiny_model, tmp_path / "base")
    expand(base, tmp_path / "pro", every=2)
    AutoConfig.from_pretrained(tmp_path / "pro").save_pretrained(tmp_path / "pro")
    written = json.loads((tmp_path / "pro" / "config.json").read_text())
    assert "rope_parameters" in written  # the round trip did add a key the base does not have
    written["unsloth_version"] = "2025.1.1"  # a key no config class defines: what tools add as a stamp
    (tmp_path / "pro" / "config.json").write_text(json.dumps(written, indent=2))
    report = verify_identity(tmp_path / "pro", base=base, engine="native")
    assert report.verdict == "identical", report.reason


@pytest.mark.hf
def test_changed_head_of_a_tied_model_is_not_an_extra(
    tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    """A tied expansion stores no head: a trained checkpoint that does (the trainer untied it) must hold the
    frozen embedding matrix there, or the frozen head changed."""
    from safetensors.torch import load_file, save_file

    from llamapro_cli.freeze.audit import verify_frozen

    expand(tiny_model("llama", "tied"), tmp_path / "pro", every=2, digests=True)
    state = load_file(tmp_path / "pro" / "model.safetensors")
    assert "lm_head.weight" not in state
    (tmp_path / "same").mkdir()
    save_file(
        {**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()},
        tmp_path / "same" / "x.safetensors",
    )
    report = verify_frozen(tmp_path / "pro", tmp_path / "same")
    assert report.ok and "lm_head.weight" not in report.extra
    (tmp_path / "moved").mkdir()
    moved = {**state, "base_model.model.lm_head.weight": state["model.embed_tokens.weight"] + 0.5}
    save_file(moved, tmp_path / "moved" / "x.safetensors")
    report = verify_frozen(tmp_path / "pro", tmp_path / "moved")
    assert not report.ok and [c.name for c in report.changed] == ["lm_head.weight"]
    assert "model.embed_tokens.weight" in report.changed[0].reason


@pytest.mark.hf
@pytest.mark.parametrize(("family", "window"), [("llama4_text", 4), ("qwen2_moe", 4)])
def test_window_of_layers_with_several_kind_words_is_active(
    tiny_model: Callable[..., Path], family: str, window: int
) -> None:
    """Layer kinds join one word per per-layer field ("rope moe chunked_attention"): a chunked or sliding
    layer among them still makes its window active, so the prefill goes past it (or a warning says not)."""
    from llamapro_cli.architectures.layers import layer_kinds
    from llamapro_cli.checkpoint import Checkpoint
    from llamapro_cli.verify.inputs import active_window

    ckpt = Checkpoint.open(tiny_model(family))
    kinds = layer_kinds(ckpt.family, ckpt.config) or []
    assert any(" " in k and ("chunked" in k or "sliding" in k) for k in kinds)
    assert active_window(ckpt) == window


@pytest.mark.hf
def test_tied_weights_saved_under_the_head_name_stand_for_the_embeddings(
    tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    """safetensors' save_model keeps one name per shared tensor, the first in sort order: a tied model's
    matrix is then saved as lm_head.weight only. It is the embedding matrix, not a missing tensor."""
    from safetensors.torch import load_file, save_file

    from llamapro_cli.freeze.audit import verify_frozen

    expand(tiny_model("llama", "tied"), tmp_path / "pro", every=2, digests=True)
    state = load_file(tmp_path / "pro" / "model.safetensors")
    state["lm_head.weight"] = state.pop("model.embed_tokens.weight")
    (tmp_path / "t").mkdir()
    save_file(state, tmp_path / "t" / "model.safetensors")
    report = verify_frozen(tmp_path / "pro", tmp_path / "t")
    assert report.ok and not report.missing and not report.extra
    state["lm_head.weight"] = state["lm_head.weight"] + 0.5
    save_file(state, tmp_path / "t" / "model.safetensors")
    report = verify_frozen(tmp_path / "pro", tmp_path / "t")
    assert not report.ok and [c.name for c in report.changed] == ["model.embed_tokens.weight"]
