"""Every model family of the registry, checked against transformers itself (issue 5).

For each family a tiny model built from its config class (weights perturbed, so norms and routers are
non-trivial) is expanded with the real `llamapro_cli.expand.expand`, with insert points that *break* any
periodic pattern (copies of a global/NoPE/MoE/attention layer), reloaded with no missing, unexpected or
mismatched keys, and compared with `torch.equal`: full forward and cached decoding (base cached vs
expanded cached), sequences longer than every window/chunk, for configs with explicit per-layer lists and
legacy configs without them, the Mamba-style families included (a model's cached logits differ from its
own full forward on the CPU slow path, but base-cached and expanded-cached are equal bit for bit).
Also: every per-layer field and ported formula against transformers' config classes (or the layers its
modeling code builds), each formula also on probe configs where it alone decides (its key removed, each
key it reads removed or set to edge values); families without per-layer fields against transformers'
uniform layers; every refusal (exit code, one line, nothing written), MTP renumbering, FP8/MXFP4 byte
surgery, pattern warnings and the generated doc.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

import tiny_models as tm
import transformers
from huggingface_hub.errors import StrictDataclassClassValidationError
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from llamapro_cli.architectures.families import FAMILIES
from llamapro_cli.architectures.layers import effective_values, is_active, layer_signature
from llamapro_cli.architectures.matrix import support_matrix_markdown
from llamapro_cli.architectures.record import Family, LayerField, ValueKind
from llamapro_cli.architectures.registry import config_keys, family_for, fields_of, num_layers
from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.cli.app import app
from llamapro_cli.expand import expand

pytestmark = pytest.mark.hf
TinyModel = Callable[..., Path]
ZOO = [f for f in tm.FAMILIES if f not in tm.CORE_FAMILIES]
# Insert points per family (6 layers): each set copies a layer whose kind the index pattern would flip.
AFTER = {
    "gemma3_text": [2, 4],  # global at 2, 5 (pattern 3)
    "gemma3": [2, 4],
    "cohere2": [1, 3],  # global/NoPE at 3
    "olmo3": [1, 3],
    "qwen2_moe": [1, 2, 4],  # MoE 1, 5; sliding 0, 2
    "qwen3_moe": [1, 3, 4],  # MoE 1, 5; dense 3 (mlp_only_layers)
    "deepseek_v2": [1, 3],  # dense 0, 1 stay a prefix
    "deepseek_v3": [1, 3],
    "llama4_text": [1, 2, 4],  # MoE 1, 3, 5; NoPE 2, 5
    "llama4": [1, 2, 4],  # chunked RoPE MoE 1, NoPE 2, chunked RoPE dense 4
    "qwen3_next": [1, 2, 3],  # full attention 2, 5; MoE 1, 5
    "lfm2": [1, 2],  # attention 2, 5
    "bamba": [2, 3],
    "granitemoehybrid": [2, 3],
    "nemotron_h": [1, 2, 4],  # moe, attention, mlp
}
IDENTITY = [
    pytest.param(f, v, id=f"{f}-{v}")
    for f in ZOO
    for v in tm.FAMILIES[f].variants
    if (f, v) not in (("gpt2", "inverse_layer_idx"), ("jamba", "default"))
]
runner = CliRunner()


def _expand(base: Path, out: Path, family: str, **plan: object) -> Family:
    if not plan:
        plan = {"after": AFTER.get(family, [1, 4])}
    report = expand(base, out, **plan)  # type: ignore[arg-type]
    assert report.num_layers_out > report.num_layers_in
    return Checkpoint.open(out).family


@pytest.mark.parametrize(("family", "variant"), IDENTITY)
def test_expansion_is_exact(tiny_model: TinyModel, tmp_path: Path, family: str, variant: str) -> None:
    spec = tm.FAMILIES[family]
    base = tiny_model(family, variant)
    _expand(base, tmp_path / "out", family)
    tm.assert_identical(
        base, tmp_path / "out", seq_len=spec.seq_len, cached=spec.cached, realign=spec.realign
    )
    # The structural signature verify-identity uses: every copy behaves like its source.
    old = json.loads((base / "config.json").read_text())
    new = json.loads((tmp_path / "out" / "config.json").read_text())
    fam = family_for(old)
    rec = json.loads((tmp_path / "out" / "llamapro.json").read_text())
    before, after = layer_signature(fam, old), layer_signature(fam, new)
    assert before is not None and after is not None
    assert after == [before[layer["source"]] for layer in rec["layers"]]


@pytest.mark.parametrize("variant", ["default", "legacy"])
def test_llama4_multimodal_keeps_its_layout(tiny_model: TinyModel, tmp_path: Path, variant: str) -> None:
    """Copies land under language_model.model.layers (what 5.24 writes), lists go to text_config, and
    every non-text tensor (vision model, projector) is copied byte for byte."""
    base = tiny_model("llama4", variant)
    fam = _expand(base, tmp_path / "out", "llama4")
    assert fam.layer_prefix == "language_model.model.layers."
    old, new = load_file(base / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert not new["language_model.model.layers.2.self_attn.o_proj.weight"].any()  # copy of MoE layer 1
    assert not new["language_model.model.layers.2.feed_forward.experts.down_proj"].any()
    assert not new["language_model.model.layers.2.feed_forward.shared_expert.down_proj.weight"].any()
    assert not new["language_model.model.layers.4.feed_forward.down_proj.weight"].any()  # copy of NoPE 2
    other = [k for k in old if not k.startswith("language_model.")]
    assert other and all(old[k].equal(new[k]) for k in other)
    text = json.loads((tmp_path / "out" / "config.json").read_text())["text_config"]
    assert text["num_hidden_layers"] == 9
    assert text["no_rope_layers"] == [1, 1, 1, 0, 0, 1, 1, 1, 0]
    assert text["moe_layers"] == [1, 2, 5, 8]


# Newer on-disk names of multimodal Gemma 3 (what transformers keeps in memory): prefix rewrites.
GEMMA3_NEW_NAMES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


def _renamed(name: str) -> str:
    return next((new + name[len(old) :] for old, new in GEMMA3_NEW_NAMES if name.startswith(old)), name)


def test_gemma3_multimodal_accepts_both_on_disk_layouts(tiny_model: TinyModel, tmp_path: Path) -> None:
    """5.24's save_pretrained writes language_model.model.layers.{i}; checkpoints saved elsewhere carry
    model.language_model.layers.{i}. Both expand exactly, each keeping its own names."""
    import torch

    base = tiny_model("gemma3", "legacy")
    assert any(k.startswith("language_model.model.layers.") for k in load_file(base / "model.safetensors"))
    new_layout = tmp_path / "new_layout"
    shutil.copytree(base, new_layout)
    state = load_file(new_layout / "model.safetensors")
    save_file({_renamed(k): v for k, v in state.items()}, new_layout / "model.safetensors", {"format": "pt"})
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    # load_model asserts no missing/unexpected/mismatched keys; same logits: the same model.
    assert tm.logits_full(tm.load_model(new_layout), ids).equal(tm.logits_full(tm.load_model(base), ids))
    prefixes = {}
    for folder in (base, new_layout):  # the old layout's exactness is test_expansion_is_exact[gemma3-legacy]
        out = tmp_path / f"{folder.name}-pro"
        fam = _expand(folder, out, "gemma3")
        state = load_file(out / "model.safetensors")
        assert all(k in state for k in (*fam.roles.embeddings, *fam.roles.final_norm))
        assert f"{fam.layer_prefix}7.self_attn.o_proj.weight" in state
        assert not state[f"{fam.layer_prefix}3.mlp.down_proj.weight"].any()  # copy of layer 2
        assert not any(k.startswith("language_model.") for k in state) or folder == base
        prefixes[folder.name] = fam.layer_prefix
    assert prefixes == {
        base.name: "language_model.model.layers.",
        "new_layout": "model.language_model.layers.",
    }
    tm.assert_identical(new_layout, tmp_path / "new_layout-pro")


def test_nemotron_h_legacy_pattern_is_rewritten(tiny_model: TinyModel, tmp_path: Path) -> None:
    """A config with only hybrid_override_pattern (+ num_hidden_layers): copies of moe 1, attention 2 and
    mlp 4 break the pattern; both the pattern string and an explicit layers_block_type are written."""
    base = tiny_model("nemotron_h", "legacy")
    assert "layers_block_type" not in json.loads((base / "config.json").read_text())
    _expand(base, tmp_path / "out", "nemotron_h")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["hybrid_override_pattern"] == "MEE**M--E"
    assert cfg["num_hidden_layers"] == 9
    chars = {"linear_attention": "M", "moe": "E", "full_attention": "*", "mlp": "-"}
    assert "".join(chars[t] for t in cfg["layers_block_type"]) == "MEE**M--E"
    # What transformers makes of it (exact full-sequence logits: test_expansion_is_exact[nemotron_h-legacy]).
    loaded = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert loaded.hybrid_override_pattern == "MEE**M--E" and loaded.num_hidden_layers == 9


def test_jamba_whole_periods_are_exact(tiny_model: TinyModel, tmp_path: Path) -> None:
    base = tiny_model("jamba")
    _expand(base, tmp_path / "out", "jamba", every=2, copies=2)
    tm.assert_identical(base, tmp_path / "out")


def _record(family: str) -> Family:
    """The record of a tiny-model family (tiny_models names the config class, whose model_type we read)."""
    return family_for({"model_type": getattr(transformers, tm.FAMILIES[family].config_class).model_type})


FORMULA_CASES = [
    pytest.param(f, v, id=f"{f}-{v}")
    for f, v in tm.all_variants()
    if _record(f).layer_fields and (f, v) != ("gpt2", "inverse_layer_idx")
]
UNIFORM_CASES = [
    pytest.param(f, v, id=f"{f}-{v}")
    for f, v in tm.all_variants()
    if not _record(f).layer_fields and (f, v) != ("gpt2", "inverse_layer_idx")
]


def _decoder_layers(config: object, n: int) -> list[object]:
    """The n decoder layers of the model transformers builds from `config` (on the meta device: no data)."""
    import torch

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    lists = [
        m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.ModuleList) and name.endswith("layers") and len(m) == n
    ]
    assert len(lists) == 1, [name for name, _ in model.named_modules() if name.endswith("layers")]
    return list(lists[0])


def _dense(layer: object) -> bool:
    name = type(layer.mlp).__name__  # type: ignore[attr-defined]
    assert name.endswith("MLP") or "Moe" in name or "MoE" in name, name
    return name.endswith("MLP")


def _theirs(key: str, config: object, n: int) -> list[object]:
    """One per-layer field's values as transformers has them: from its config class where the class
    derives them, from the modeling code (which MLP each decoder layer builds) where only it decides."""
    text = config.get_text_config()  # type: ignore[attr-defined]
    if key in (
        "layer_types",
        "no_rope_layers",
        "layers_block_type",
        "mlp_layer_types",
        "hybrid_override_pattern",
    ):
        return list(getattr(text, key))
    if key == "max_window_layers":
        return [i < text.max_window_layers for i in range(n)]
    if key == "moe_layers":
        return [i in text.moe_layers for i in range(n)]
    if key == "attn_layer_indices":
        return [t == "full_attention" for t in text.layers_block_type]
    if key == "full_attn_idxs":
        return [t == "full_attention" for t in text.layer_types]
    if key == "mixer":
        return list(text.layers_block_type)
    if key == "layer_kind":  # jamba: attention/mamba from the period, MoE where a layer has experts
        kinds = zip(text.layers_block_type, text.layers_num_experts, strict=True)
        return [f"{kind} {'moe' if experts > 1 else 'dense'}" for kind, experts in kinds]
    if key in ("mlp_only_layers", "first_k_dense_replace"):  # per-layer dense flags
        return [_dense(layer) for layer in _decoder_layers(config, n)]
    raise AssertionError(f"no transformers oracle for per-layer field {key!r}: add one here")


# Values tried for each key a formula reads (besides removing it), by the kind the record declares.
PROBES: dict[ValueKind, list[object]] = {
    ValueKind.BOOL: [True, False],
    ValueKind.COUNT: [0, 1, 2, 3, 7],
    ValueKind.POSITIVE: [1, 2, 3, 7],
    ValueKind.INDICES: [[], [0], [1, 4]],
}


def _probes(
    fld: LayerField, raw: dict[str, Any], sub_path: tuple[str, ...]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """config.json variants on which the formula alone decides: its own key removed (unless the formula
    always applies), then each key it reads removed or set to each probe value of its kind."""

    def edited(change: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
        config = json.loads(json.dumps(raw))
        sub = config
        for key in sub_path:
            sub = sub[key]
        if not fld.derive_always:
            sub.pop(fld.key, None)
        change(sub)
        return config

    assert fld.derive is not None
    yield "as saved", edited(lambda sub: None)
    for read in fld.derive.reads:
        if read.key == fld.key and not fld.derive_always:
            continue
        yield f"without {read.key}", edited(lambda sub, k=read.key: sub.pop(k, None))
        for value in PROBES.get(read.kind, []):
            yield f"{read.key}={value}", edited(lambda sub, k=read.key, v=value: sub.update({k: v}))


def _loaded(folder: Path, raw: dict[str, Any]) -> object | None:
    """transformers' config class for `raw`; None when transformers itself refuses those values."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(raw))
    try:
        return transformers.AutoConfig.from_pretrained(folder)
    except (ValueError, TypeError, StrictDataclassClassValidationError):
        return None


@pytest.mark.parametrize(("family", "variant"), FORMULA_CASES)
def test_ported_formulas_match_transformers(
    tiny_model: TinyModel, tmp_path: Path, family: str, variant: str
) -> None:
    """Every per-layer field of the config, as we read it, equals transformers' per-layer values; and each
    ported formula, where it alone decides (its key removed; each key it reads removed or probed), equals
    what transformers derives from the same config.json."""
    raw = json.loads((tiny_model(family, variant) / "config.json").read_text())
    fam = family_for(raw)
    sub, n = fam.sub_config(raw), num_layers(fam, raw)
    assert n is not None
    config = transformers.AutoConfig.from_pretrained(tiny_model(family, variant))
    compared: list[str] = []
    probes = itertools.count()
    for fld in fields_of(fam):
        if not is_active(fld, sub) or (ours := effective_values(fld, sub, n)) is None:
            continue
        assert ours == _theirs(fld.key, config, n), f"{fld.key} as read"
        compared.append(fld.key)
        for label, probe in _probes(fld, raw, fam.config_path) if fld.derive else ():
            theirs = _loaded(tmp_path / str(next(probes)), probe)
            if theirs is None:
                continue  # transformers refuses the probe: no truth to compare with
            truth = _theirs(fld.key, theirs, n)
            if len(truth) != n:
                # Without layers_block_type and hybrid_override_pattern transformers falls back to a
                # fixed 4-layer list whatever num_hidden_layers says: no n-layer truth to compare with.
                assert fam.name == "nemotron_h", (fld.key, label, truth)
                continue
            formula = fld.derive(fam.sub_config(probe), n)
            assert formula == truth, f"{fld.key}, {label}: ours by {fld.derive.source}"
            compared.append(f"{fld.key} ({label})")
    assert len(compared) > 1 or fam.name == "nemotron_h", compared


@pytest.mark.parametrize(("family", "variant"), UNIFORM_CASES)
def test_families_without_per_layer_fields_have_uniform_layers(
    tiny_model: TinyModel, family: str, variant: str
) -> None:
    """A record without per-layer fields claims every layer behaves alike: so do we and transformers."""
    raw = json.loads((tiny_model(family, variant) / "config.json").read_text())
    fam = family_for(raw)
    signature = layer_signature(fam, raw)
    assert signature is not None and len(set(signature)) == 1
    text = transformers.AutoConfig.from_pretrained(tiny_model(family, variant)).get_text_config()
    for key in ("layer_types", "layers_block_type", "mlp_layer_types"):
        values = getattr(text, key, None)
        assert values is None or len(set(values)) == 1, f"{key}: {values}"


def test_every_formula_cites_its_source_and_every_key_has_one_kind() -> None:
    for fam in FAMILIES:
        for fld in fields_of(fam):
            assert fld.derive is None or fld.derive.source, (fam.name, fld.key)
        declared: dict[str, ValueKind] = {}
        for fld in fields_of(fam):
            for key in (*fld.reads(), *fam.reads):
                assert declared.setdefault(key.key, key.kind) is key.kind, (fam.name, key.key)
        assert {k.key for k in config_keys(fam)} == set(declared) | {fam.count_key} | (
            {fam.extra_layers_key} if fam.extra_layers_key else set()
        )


def _assert_refused(result: object, code: int, words: str, out: Path) -> None:
    assert result.exit_code == code, result.stderr  # type: ignore[attr-defined]
    lines = result.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert lines[0].startswith("error: ") and words in lines[0], lines
    assert all(line.startswith(("error: ", "hint: ")) for line in lines) and len(lines) <= 2, lines
    assert result.stdout == ""  # type: ignore[attr-defined]
    assert not out.exists() and not list(out.parent.glob(out.name + "*")), "something was written"


def _cli_expand(base: Path, out: Path, *args: str) -> object:
    return runner.invoke(app, ["expand", "--in", str(base), "--out", str(out), *args])


def _config_only(tmp_path: Path, config_class: str, **kw: object) -> Path:
    folder = tmp_path / config_class
    folder.mkdir()
    getattr(transformers, config_class)(**kw).to_json_file(folder / "config.json")
    return folder


@pytest.mark.parametrize(
    ("config_class", "words"),
    [
        ("ZambaConfig", "refused zamba"),
        ("Zamba2Config", "refused zamba2"),
        ("DiffLlamaConfig", "refused diffllama"),
        ("Gemma3nConfig", "refused gemma3n"),
    ],
)
def test_index_dependent_families_are_refused(tmp_path: Path, config_class: str, words: str) -> None:
    base = _config_only(tmp_path, config_class)
    out = tmp_path / "out"
    _assert_refused(_cli_expand(base, out, "--every", "2"), 3, words, out)


def test_gpt2_inverse_layer_idx_is_refused(tiny_model: TinyModel, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _cli_expand(tiny_model("gpt2", "inverse_layer_idx"), out, "--every", "2")
    _assert_refused(result, 3, "scale_attn_by_inverse_layer_idx", out)


def test_jamba_broken_period_is_refused(tiny_model: TinyModel, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _cli_expand(tiny_model("jamba"), out, "--after", "1")
    _assert_refused(result, 2, "cannot be expressed for jamba", out)
    assert "--every 2 --copies 2" in result.stderr


def test_deepseek_dense_after_moe_is_refused(tiny_model: TinyModel, tmp_path: Path) -> None:
    # Copies of layers 0-2 stacked after layer 2 (MoE) put dense copies after a MoE layer.
    out = tmp_path / "out"
    result = _cli_expand(tiny_model("deepseek_v3"), out, "--add", "3", "--placement", "bottom")
    _assert_refused(result, 2, "first_k_dense_replace", out)


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes"])
def test_packed_quantization_is_refused(tiny_model: TinyModel, tmp_path: Path, method: str) -> None:
    base = tmp_path / "base"
    shutil.copytree(tiny_model("mixtral"), base)
    _edit_config(base, lambda c: c.update(quantization_config={"quant_method": method, "bits": 4}))
    out = tmp_path / "out"
    _assert_refused(_cli_expand(base, out, "--every", "2"), 3, f"refused quantization '{method}'", out)


def _edit_config(folder: Path, edit: Callable[[dict[str, object]], object]) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def _add_tensors(folder: Path, extra: dict[str, object], drop: tuple[str, ...] = ()) -> None:
    path = folder / "model.safetensors"
    state = {k: v for k, v in load_file(path).items() if k not in drop}
    state.update(extra)  # type: ignore[arg-type]
    save_file(state, path, metadata={"format": "pt"})


def test_deepseek_mtp_layers_are_renumbered(tiny_model: TinyModel, tmp_path: Path) -> None:
    import torch

    base = tmp_path / "base"
    shutil.copytree(tiny_model("deepseek_v3"), base)
    mtp = {
        "model.layers.6.eh_proj.weight": torch.randn(64, 128),
        "model.layers.6.enorm.weight": torch.rand(64),
    }
    _add_tensors(base, mtp)
    _edit_config(base, lambda c: c.update(num_nextn_predict_layers=1))
    report = expand(base, tmp_path / "out", after=[1, 3])
    assert any("multi-token-prediction" in w for w in report.warnings)
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(got["model.layers.8.eh_proj.weight"], mtp["model.layers.6.eh_proj.weight"])
    assert "model.layers.6.eh_proj.weight" not in got
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 8


def test_fp8_block_scaled_weights_are_zeroed_and_scales_copied(tiny_model: TinyModel, tmp_path: Path) -> None:
    import torch

    base = tmp_path / "base"
    shutil.copytree(tiny_model("deepseek_v3"), base)
    state = load_file(base / "model.safetensors")
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in state.items() if k.endswith("proj.weight")}
    scales = {k + "_scale_inv": torch.rand(1, 1) + 0.5 for k in fp8}
    _add_tensors(base, {**fp8, **scales})
    qc = {
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
        "modules_to_not_convert": ["model.layers.3.mlp.gate"],
    }
    _edit_config(base, lambda c: c.update(quantization_config=qc))
    expand(base, tmp_path / "out", after=[3])
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert got["model.layers.4.self_attn.o_proj.weight"].dtype == torch.float8_e4m3fn
    assert not got["model.layers.4.self_attn.o_proj.weight"].float().any()
    assert torch.equal(
        got["model.layers.4.self_attn.o_proj.weight_scale_inv"],
        scales["model.layers.3.self_attn.o_proj.weight_scale_inv"],
    )
    new_qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert new_qc["modules_to_not_convert"] == ["model.layers.3.mlp.gate", "model.layers.4.mlp.gate"]


def test_mxfp4_blocks_are_zeroed_and_scales_copied(tiny_model: TinyModel, tmp_path: Path) -> None:
    import torch

    base = tmp_path / "base"
    shutil.copytree(tiny_model("gpt_oss"), base)
    blocks = {
        f"model.layers.{i}.mlp.experts.down_proj_blocks": torch.randint(
            1, 255, (4, 64, 4, 16), dtype=torch.uint8
        )
        for i in range(6)
    }
    scales = {
        f"model.layers.{i}.mlp.experts.down_proj_scales": torch.randint(
            100, 130, (4, 64, 4), dtype=torch.uint8
        )
        for i in range(6)
    }
    _add_tensors(
        base, {**blocks, **scales}, drop=tuple(f"model.layers.{i}.mlp.experts.down_proj" for i in range(6))
    )
    _edit_config(
        base,
        lambda c: c.update(
            quantization_config={
                "quant_method": "mxfp4",
                "modules_to_not_convert": ["model.layers.*.self_attn", "lm_head"],
            }
        ),
    )
    expand(base, tmp_path / "out", after=[1])
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert not got["model.layers.2.mlp.experts.down_proj_blocks"].any()
    assert not got["model.layers.2.mlp.experts.down_proj_bias"].any()
    assert torch.equal(
        got["model.layers.2.mlp.experts.down_proj_scales"],
        scales["model.layers.1.mlp.experts.down_proj_scales"],
    )
    assert torch.equal(
        got["model.layers.3.mlp.experts.down_proj_blocks"],
        blocks["model.layers.2.mlp.experts.down_proj_blocks"],
    )


def test_pattern_warnings_in_dry_run_and_inspect(tiny_model: TinyModel, tmp_path: Path) -> None:
    base = tiny_model("gemma2", "legacy")
    keep = _cli_expand(base, tmp_path / "keep", "--every", "2", "--copies", "2", "--dry-run")
    assert keep.exit_code == 0 and "periodic" not in keep.stderr
    broken = _cli_expand(base, tmp_path / "out", "--after", "1,4")
    assert broken.exit_code == 0
    assert "layer_types: layers 2, 3, 4, 5 break gemma2's periodic layer pattern" in broken.stderr
    shown = runner.invoke(app, ["inspect", str(tmp_path / "out")])
    assert shown.exit_code == 0 and "break gemma2's periodic layer pattern" in shown.stderr
    assert "periodic" not in runner.invoke(app, ["inspect", str(base)]).stderr


def test_inspect_shows_layer_kinds(tiny_model: TinyModel) -> None:
    report = runner.invoke(app, ["inspect", "--json", str(tiny_model("llama4_text"))])
    kinds = json.loads(report.stdout)["layer_kinds"]
    assert kinds[1] == "rope moe chunked_attention" and kinds[2] == "nope dense full_attention"


def test_architectures_doc_is_current() -> None:
    doc = Path(__file__).parent.parent / "docs" / "architectures.md"
    assert doc.read_text() == support_matrix_markdown(), "regenerate: python scripts/gen_docs.py"
