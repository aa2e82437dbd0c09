"""Tests of the oracle itself (tests/tiny_models.py): every tiny model builds and loads cleanly, a correct
LLaMA Pro expansion (by the naive `reference_expand`) passes `assert_identical`, and each known way of getting
it wrong fails loudly."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import tiny_models as tm
import torch
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.hf

AFTER = [1, 4]  # copies of layers 1 and 4: new layer 3 (source 2) crosses qwen's max_window_layers=3
VARIANTS = [pytest.param(f, v, id=f"{f}-{v}") for f, v in tm.all_variants(tm.CORE_FAMILIES)]
TinyModel = Callable[..., Path]


def expand_correctly(base: Path, dst: Path) -> Path:
    return tm.reference_expand(base, dst, AFTER, tm.zero_residual_writers, tm.reference_config_edit(AFTER))


@pytest.mark.parametrize(("family", "variant"), VARIANTS)
def test_builds_and_loads_cleanly(tiny_model: TinyModel, family: str, variant: str) -> None:
    path = tiny_model(family, variant)
    model = tm.load_model(path)
    assert model.config.num_hidden_layers == 6
    assert model.config.num_key_value_heads == 2
    layer = model.model.layers[0]
    norm = layer.input_layernorm.weight
    assert not torch.equal(norm, torch.ones_like(norm)), "norm weights must be perturbed"
    has_bias = variant in ("bias", "qkv_bias")
    assert (layer.self_attn.o_proj.bias is not None) == has_bias
    assert (layer.mlp.down_proj.bias is not None) == has_bias
    if "sliding" in variant:
        assert model.config.layer_types == ["full_attention"] * 3 + ["sliding_attention"] * 3


def test_saved_files_match_the_variant(tiny_model: TinyModel) -> None:
    tied = tiny_model("llama", "tied")
    assert "lm_head.weight" not in load_file(tied / "model.safetensors")
    index = json.loads((tiny_model("llama", "sharded") / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    raw = json.loads((tiny_model("internlm3", "qkv_bias") / "config.json").read_text())
    assert raw["qkv_bias"] is True and raw["bias"] is True and "attention_bias" not in raw
    assert "layer_types" not in json.loads(
        (tiny_model("qwen2", "sliding_legacy") / "config.json").read_text()
    )


def test_build_is_seeded(tmp_path: Path) -> None:
    a = load_file(tm.build_tiny("llama", tmp_path / "a") / "model.safetensors")
    b = load_file(tm.build_tiny("llama", tmp_path / "b") / "model.safetensors")
    c = load_file(tm.build_tiny("llama", tmp_path / "c", seed=1) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize(("family", "variant"), VARIANTS)
def test_correct_expansion_is_identical(
    tiny_model: TinyModel, tmp_path: Path, family: str, variant: str
) -> None:
    base = tiny_model(family, variant)
    tm.assert_identical(base, expand_correctly(base, tmp_path / "x"))


def test_correct_expansion_is_identical_sdpa(tiny_model: TinyModel, tmp_path: Path) -> None:
    base = tiny_model("qwen2", "sliding")
    tm.assert_identical(base, expand_correctly(base, tmp_path / "x"), attn="sdpa")


def test_correct_expansion_is_identical_bf16(tiny_model: TinyModel, tmp_path: Path) -> None:
    base = tiny_model("llama", "bias", dtype="bfloat16")
    tm.assert_identical(base, expand_correctly(base, tmp_path / "x"), dtype=torch.bfloat16)


@pytest.mark.parametrize(("family", "variant"), [("llama", "default"), ("qwen2", "sliding")])
def test_unzeroed_copies_fail(tiny_model: TinyModel, tmp_path: Path, family: str, variant: str) -> None:
    base = tiny_model(family, variant)
    wrong = tm.reference_expand(base, tmp_path / "x", AFTER, lambda _: False, tm.reference_config_edit(AFTER))
    with pytest.raises(AssertionError, match=r"full: max \|Δ\|"):
        tm.assert_identical(base, wrong)


@pytest.mark.parametrize(("family", "variant"), [("llama", "bias"), ("internlm3", "qkv_bias")])
def test_unzeroed_bias_fails(tiny_model: TinyModel, tmp_path: Path, family: str, variant: str) -> None:
    base = tiny_model(family, variant)

    def weights_only(name: str) -> bool:
        return tm.zero_residual_writers(name) and name.endswith(".weight")

    wrong = tm.reference_expand(base, tmp_path / "x", AFTER, weights_only)
    with pytest.raises(AssertionError, match=r"full: max \|Δ\|"):
        tm.assert_identical(base, wrong)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_naive_count_edit_on_legacy_config_fails(tiny_model: TinyModel, tmp_path: Path, family: str) -> None:
    # Without layer_types, transformers re-derives sliding layers as i >= max_window_layers on the NEW
    # numbering: original layer 2 (now 3) silently becomes sliding.
    base = tiny_model(family, "sliding_legacy")
    naive = tm.reference_expand(base, tmp_path / "x", AFTER, tm.zero_residual_writers)
    with pytest.raises(AssertionError, match=r"cached: max \|Δ\|"):
        tm.assert_identical(base, naive)


def test_naive_count_edit_on_explicit_config_is_refused(tiny_model: TinyModel, tmp_path: Path) -> None:
    base = tiny_model("qwen2", "sliding")
    naive = tm.reference_expand(base, tmp_path / "x", AFTER, tm.zero_residual_writers)
    with pytest.raises(Exception, match="layer_types"):  # huggingface_hub StrictDataclassClassValidationError
        tm.load_model(naive)


def _rewrite(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_fails_the_loader(tiny_model: TinyModel, tmp_path: Path) -> None:
    # A missing zero tensor is the dangerous case: transformers would random-initialise it and warn.
    base = tiny_model("llama", "default")
    broken = expand_correctly(base, tmp_path / "x")
    _rewrite(broken, lambda sd: sd.pop("model.layers.2.mlp.down_proj.weight"))
    with pytest.raises(AssertionError, match=r"missing_keys.*model\.layers\.2\.mlp\.down_proj\.weight"):
        tm.assert_identical(base, broken)


def test_unexpected_tensor_fails_the_loader(tiny_model: TinyModel, tmp_path: Path) -> None:
    base = tiny_model("llama", "default")
    broken = expand_correctly(base, tmp_path / "x")
    _rewrite(broken, lambda sd: sd.update({"model.layers.8.mlp.down_proj.weight": torch.zeros(64, 128)}))
    with pytest.raises(AssertionError, match="unexpected_keys"):
        tm.load_model(broken)


def test_near_miss_fails(tiny_model: TinyModel, tmp_path: Path) -> None:
    """A copy whose o_proj is 1e-6 instead of 0 moves the logits by ~6e-5: any tolerance (allclose's
    default, or 1e-3) would pass it, so the oracle must compare exactly."""
    base = tiny_model("llama", "default")
    near = expand_correctly(base, tmp_path / "x")  # layer 2 is the copy of layer 1
    _rewrite(near, lambda sd: sd["model.layers.2.self_attn.o_proj.weight"].fill_(1e-6))
    with pytest.raises(AssertionError, match=r"full: max \|Δ\| = ") as info:
        tm.assert_identical(base, near)
    deltas = [float(x) for x in re.findall(r"max \|Δ\| = ([0-9.e+-]+)", str(info.value))]
    assert deltas and 0 < max(deltas) < 1e-3, deltas


def test_vacuous_comparison_is_refused(tiny_model: TinyModel) -> None:
    base = tiny_model("llama", "default")
    with pytest.raises(AssertionError, match="vacuous"):
        tm.assert_identical(base, base)


def test_sequence_shorter_than_window_is_refused(tiny_model: TinyModel, tmp_path: Path) -> None:
    base = tiny_model("mistral", "default")
    with pytest.raises(AssertionError, match="sliding windows"):
        tm.assert_identical(base, expand_correctly(base, tmp_path / "x"), seq_len=4)


def test_every_family_is_compared_with_cached_decoding() -> None:
    """docs/architectures.md promises cached decoding for every family: base-cached against expanded-cached
    is exact for all of them, the Mamba-style ones included."""
    assert [name for name, spec in tm.FAMILIES.items() if not spec.cached] == []
