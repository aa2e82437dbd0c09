"""`llamapro verify-identity`: exit 0 on true expansions (both engines, every family and variant), exit 1
naming the layer on every kind of wrong expansion, exit 3 when it cannot check, and the JSON contract.

Checkpoints are expanded once per session with the real `expand`; a test that breaks one works on a
copy. Tests that need transformers (the tiny models, the transformers engine) are marked `hf`; the
demo checkpoint (torch + safetensors only) with the native engine covers the rest without it.
"""

from __future__ import annotations

import os

# MKL rounds by memory alignment unless told not to, and reads the mode at its first matrix product;
# verify-identity sets it too, but in a test process the first product may come from another test.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from llamapro_cli.cli.app import app
from llamapro_cli.demo import write_demo_checkpoint
from llamapro_cli.expand import expand
from llamapro_cli.io import ranges
from llamapro_cli.verify import inputs as tokens
from llamapro_cli.verify import structural as structural
from llamapro_cli.verify.identity import verify_identity

AFTER = (1, 3)  # copies right after layers 1 and 3: breaks qwen's sliding threshold at 3
WINDOW = 4  # tiny_models.WINDOW
# The core families' tiny_models variants (every one the native engine supports), spelled out so this
# module imports without transformers; checked against tiny_models below.
VARIANTS = [
    ("llama", "default"),
    ("llama", "tied"),
    ("llama", "bias"),
    ("llama", "sharded"),
    ("mistral", "default"),
    ("qwen2", "default"),
    ("qwen2", "sliding"),
    ("qwen2", "sliding_legacy"),
    ("qwen3", "default"),
    ("qwen3", "sliding"),
    ("qwen3", "sliding_legacy"),
    ("internlm3", "default"),
    ("internlm3", "qkv_bias"),
]
REPORT_KEYS = {
    "schema_version", "verdict", "reason", "expanded", "base", "architecture", "num_layers_in",
    "num_layers_out", "new_layers", "mapping", "structural", "engine", "device", "dtype", "input", "seed",
    "tokens", "prefill", "decode_steps", "atol", "full_max_abs", "cached_max_abs", "greedy_tokens_equal",
    "first_divergence_layer", "first_divergence_position", "divergence", "peak_bytes_loaded", "warnings",
    "seconds", "peak_rss_bytes", "peak_gpu_bytes", "serving",
}  # fmt: skip
# Every other (family, variant) of the oracle, so every registry family is verified end to end with the
# transformers engine (test_every_registry_model_type_has_a_tiny_model keeps the oracle complete).
try:
    import tiny_models as _tm

    OTHER_VARIANTS = [
        pytest.param(f, v, id=f"{f}-{v}") for f, v in _tm.all_variants() if (f, v) not in VARIANTS
    ]
except ImportError:  # pragma: no cover - transformers is a dev dependency
    OTHER_VARIANTS = []
# Families whose layout takes only some plans: jamba's attention/expert periods need whole periods.
PLANS: dict[str, dict[str, Any]] = {"jamba": {"every": 2, "copies": 2}}
# Variants expand refuses (exit 3), with a word of the reason: there is nothing to verify.
REFUSED = {("gpt2", "inverse_layer_idx"): "scale_attn_by_inverse_layer_idx"}
STRUCTURAL_KEYS = {"ok", "mismatch", "layer", "tensor", "tensors_checked", "bytes_compared", "seconds"}
INFERRED = "inferred from zero branch-final tensors"


def cli(*args: str | Path) -> Any:
    return CliRunner().invoke(app, ["verify-identity", *map(str, args)])


def as_json(result: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


# --- fixtures: each checkpoint built and expanded once per session -------------------------------------


@pytest.fixture(scope="session")
def expanded_tiny(
    tiny_model: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., tuple[Path, Path]]:
    """(base, expanded) for a tiny family/variant, expanded with --after 1,3 (or its PLANS). Read-only."""
    cache: dict[tuple[str, str], tuple[Path, Path]] = {}

    def make(family: str, variant: str = "default") -> tuple[Path, Path]:
        if (family, variant) not in cache:
            base = tiny_model(family, variant)
            out = tmp_path_factory.mktemp(f"exp-{family}-{variant}") / "expanded"
            expand(base, out, **PLANS.get(family, {"after": AFTER}))
            cache[family, variant] = (base, out)
        return cache[family, variant]

    return make


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The `make demo` pair: `llamapro demo-checkpoint` (bf16) and `expand --every 4` of it. Read-only."""
    root = tmp_path_factory.mktemp("demo")
    write_demo_checkpoint(root / "demo", layers=8)
    expand(root / "demo", root / "demo-exp", every=4)
    return root / "demo", root / "demo-exp"


def copy_of(src: Path, tmp_path: Path, name: str = "copy") -> Path:
    dest = tmp_path / name
    shutil.copytree(src, dest)
    return dest


def edit_tensor(folder: Path, name: str, change: Callable[[Any], Any]) -> None:
    """Rewrite one tensor in place with the safetensors library (as another tool would)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    index = folder / "model.safetensors.index.json"
    shard = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
    with safe_open(str(folder / shard), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(folder / shard))
    tensors[name] = change(tensors[name])
    save_file(tensors, str(folder / shard), metadata=metadata)


def without_provenance(expanded: Path, tmp_path: Path) -> Path:
    """Another tool's output: no llamapro.json, the zeroed tensors written as -0.0 (as mergekit does)."""
    import torch

    record = json.loads((expanded / "llamapro.json").read_text())
    copy = copy_of(expanded, tmp_path, "no-provenance")
    (copy / "llamapro.json").unlink()
    for name in record["zeroed"]:
        edit_tensor(copy, name, lambda t: torch.full_like(t, -0.0))
    return copy


# --- true expansions ----------------------------------------------------------------------------------


@pytest.mark.hf
def test_variant_list_matches_the_oracle() -> None:
    import tiny_models

    from llamapro_cli.verify.spec import SUPPORTED_FAMILIES

    assert set(VARIANTS) <= set(tiny_models.all_variants())
    core = {"internlm3": "llama"}
    assert {core.get(family, family) for family, _ in VARIANTS} == SUPPORTED_FAMILIES


@pytest.mark.hf
@pytest.mark.parametrize("engine", ["transformers", "native"])
@pytest.mark.parametrize(("family", "variant"), VARIANTS)
def test_true_expansion_is_identical(
    expanded_tiny: Callable[..., tuple[Path, Path]], family: str, variant: str, engine: str
) -> None:
    _, out = expanded_tiny(family, variant)
    result = cli("--out", out, "--engine", engine, "--json")
    assert result.exit_code == 0, result.stderr + result.stdout
    assert result.stderr == ""
    doc = as_json(result)
    assert doc["verdict"] == "identical" and doc["reason"] is None
    assert doc["structural"]["ok"] and doc["structural"]["tensors_checked"] > 0
    assert (doc["full_max_abs"], doc["cached_max_abs"], doc["greedy_tokens_equal"]) == (0.0, 0.0, True)
    assert doc["engine"] == engine and doc["dtype"] == "float32" and doc["device"] == "cpu"
    assert doc["mapping"] == "llamapro.json" and doc["new_layers"] == [2, 5]
    assert doc["tokens"] == doc["prefill"] + doc["decode_steps"] and doc["decode_steps"] == 8
    if variant.startswith("sliding") or family == "mistral":
        assert doc["prefill"] > WINDOW  # every active window is exceeded by the prefill alone


def test_demo_expansion_in_bf16_verifies(demo: tuple[Path, Path]) -> None:
    """What `make demo` runs last (the native engine here, so it needs no transformers)."""
    _, out = demo
    result = cli("--out", out, "--engine", "native")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[0] == "verdict: IDENTICAL"
    assert "native on cpu, bfloat16" in result.stdout
    assert "full 0, cached 0 (exact comparison)" in result.stdout


@pytest.mark.hf
def test_demo_expansion_default_engine(demo: tuple[Path, Path]) -> None:
    result = cli("--out", demo[1], "--json")
    assert result.exit_code == 0, result.stderr
    doc = as_json(result)
    assert (doc["engine"], doc["dtype"], doc["verdict"]) == ("transformers", "bfloat16", "identical")


@pytest.mark.hf
@pytest.mark.parametrize(("family", "variant"), OTHER_VARIANTS)
def test_every_other_variant_is_identical_with_transformers(
    expanded_tiny: Callable[..., tuple[Path, Path]],
    tiny_model: Callable[..., Path],
    family: str,
    variant: str,
) -> None:
    """Beyond the native engine's families: multimodal text_config (gemma3, llama4), MoE experts and their
    biases (qwen2_moe, gpt-oss), MLA, hybrid Mamba/attention stacks; the structural check works from the
    family records alone, and the numerical check compares cached decoding for every one of them."""
    from llamapro_cli.errors import UnsupportedError

    if (family, variant) in REFUSED:
        with pytest.raises(UnsupportedError, match=REFUSED[family, variant]):
            expand(tiny_model(family, variant), tiny_model(family, variant).parent / "refused", after=AFTER)
        return
    _, out = expanded_tiny(family, variant)
    report = verify_identity(out)
    assert (report.verdict, report.engine, report.full_max_abs, report.cached_max_abs) == (
        "identical", "transformers", 0.0, 0.0,
    ), report.reason  # fmt: skip
    assert report.greedy_tokens_equal and report.structural is not None and report.structural.ok
    assert report.structural.tensors_checked > 0 and report.warnings == ()  # every window was exceeded
    result = cli("--out", out, "--engine", "native")
    assert result.exit_code == 3 and f"the native engine does not support {report.architecture}" in (
        result.stderr
    )


@pytest.mark.hf
def test_every_registry_model_type_has_a_tiny_model() -> None:
    import tiny_models
    import transformers

    from llamapro_cli.architectures.registry import FAMILIES

    built = {getattr(transformers, spec.config_class).model_type for spec in tiny_models.FAMILIES.values()}
    supported = {t for family in FAMILIES if not family.refuse for t in family.model_types}
    assert supported <= built, f"no tiny model for {sorted(supported - built)}"


@pytest.mark.hf
def test_forgotten_expert_bias_is_named(
    expanded_tiny: Callable[..., tuple[Path, Path]], tmp_path: Path
) -> None:
    """gpt-oss adds a per-expert bias after the down projection: a copy must zero it too."""
    import tiny_models

    if ("gpt_oss", "default") not in tiny_models.all_variants():
        pytest.skip("tiny_models has no gpt_oss")
    _, out = expanded_tiny("gpt_oss")
    bad = copy_of(out, tmp_path)
    name = "model.layers.5.mlp.experts.down_proj_bias"
    edit_tensor(bad, name, lambda t: t.clone().fill_(0.25))
    result = cli("--out", bad)
    assert result.exit_code == 1
    assert f"layer 5 is an identity copy of base layer 3, but its {name} is not all zero" in result.stderr
    numeric = verify_identity(bad, structural=False)
    assert numeric.verdict == "different" and numeric.first_divergence_position == 0


# --- wrong expansions: exit 1, the layer named --------------------------------------------------------


def test_nonzero_copy_is_named(demo: tuple[Path, Path], tmp_path: Path) -> None:
    bad = copy_of(demo[1], tmp_path)
    name = "model.layers.4.self_attn.o_proj.weight"  # layer 4 is the copy of base layer 3
    edit_tensor(bad, name, lambda t: t.clone().fill_(1e-3))
    result = cli("--out", bad)
    assert result.exit_code == 1
    assert result.stdout.startswith(
        f"verdict: DIFFERENT: layer 4 is an identity copy of base layer 3, but its {name}"
    )
    assert result.stderr.startswith(
        f"error: not identical: layer 4 is an identity copy of base layer 3, but its {name}"
    )
    assert "hint: " in result.stderr
    # The numerical check alone finds it too, in the same layer.
    report = verify_identity(bad, engine="native", structural=False)
    assert report.verdict == "different" and report.structural is None
    assert report.first_divergence_layer == 4 and "inserted layer 4" in (report.reason or "")
    assert report.full_max_abs is not None and report.full_max_abs > 0


def test_altered_original_is_named(
    demo: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    bad = copy_of(demo[1], tmp_path)
    name = "model.layers.5.mlp.up_proj.weight"  # original layer 4, now at 5
    last = (-1, -1)

    def nudge(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[last] = t[last] * 2 + 0.5  # the very last element: only a chunked compare that reaches it sees it
        return t

    edit_tensor(bad, name, nudge)
    monkeypatch.setattr(ranges, "CHUNK", 4096 + 6)  # many chunks, the last one short
    report = verify_identity(bad, numerical=False)
    assert report.verdict == "different" and report.engine is None
    assert report.structural is not None and (report.structural.layer, report.structural.tensor) == (5, name)
    assert (
        report.reason
        == f"layer 5 (base layer 4): {name} differs from model.layers.4.mlp.up_proj.weight in the base"
    )
    monkeypatch.undo()
    result = cli("--out", bad, "--json")
    assert result.exit_code == 1 and as_json(result)["structural"]["layer"] == 5
    numeric = verify_identity(bad, engine="native", structural=False)
    assert numeric.first_divergence_layer == 5 and "original layer 5" in (numeric.divergence or "")


def test_dtype_cast_is_named(demo: tuple[Path, Path], tmp_path: Path) -> None:
    import torch

    bad = copy_of(demo[1], tmp_path)
    edit_tensor(bad, "model.embed_tokens.weight", lambda t: t.to(torch.float16))
    result = cli("--out", bad)
    assert result.exit_code == 1
    assert (
        "model.embed_tokens.weight is F16[1024, 256] but model.embed_tokens.weight in the base is BF16"
        in (result.stderr)
    )


@pytest.mark.hf
def test_flipped_layer_type_is_named(expanded_tiny: Callable[..., tuple[Path, Path]], tmp_path: Path) -> None:
    """One Qwen2 `layer_types` entry wrong: same weights, but attention past the window changes."""
    _, out = expanded_tiny("qwen2", "sliding")
    bad = copy_of(out, tmp_path)
    config = json.loads((bad / "config.json").read_text())
    assert config["layer_types"][7] == "sliding_attention"  # base layer 5
    config["layer_types"][7] = "full_attention"
    (bad / "config.json").write_text(json.dumps(config, indent=2))
    result = cli("--out", bad)
    assert result.exit_code == 1
    assert (
        "config.json: layer_types gives layer 7 'full_attention', but its source (base layer 5) has "
        "'sliding_attention'" in result.stdout
    )
    for engine in ("transformers", "native"):
        report = verify_identity(bad, engine=engine, structural=False)
        assert report.verdict == "different", engine
        assert report.cached_max_abs is not None and report.cached_max_abs > 0
        # Positions the window does not cut agree: only masked positions differ.
        assert report.first_divergence_position is not None and report.first_divergence_position >= WINDOW
    assert verify_identity(bad, engine="native", structural=False).first_divergence_layer == 7


@pytest.mark.hf
def test_flipped_type_of_a_copy_is_structural_only(
    expanded_tiny: Callable[..., tuple[Path, Path]], tmp_path: Path
) -> None:
    """A copy's outputs are zero whatever its mask, so only the structural check can see its config is
    wrong; it still matters, because the copy trains with that mask."""
    _, out = expanded_tiny("qwen2", "sliding")
    bad = copy_of(out, tmp_path)
    config = json.loads((bad / "config.json").read_text())
    config["layer_types"][5] = "full_attention"  # the copy of base layer 3 (sliding)
    (bad / "config.json").write_text(json.dumps(config, indent=2))
    assert verify_identity(bad, numerical=False).verdict == "different"
    assert verify_identity(bad, engine="transformers", structural=False).verdict == "identical"


@pytest.mark.hf
def test_missing_key_in_the_expanded_model_is_named(
    expanded_tiny: Callable[..., tuple[Path, Path]], tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    _, out = expanded_tiny("llama", "default")
    bad = copy_of(out, tmp_path)
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["model.layers.4.post_attention_layernorm.weight"]
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    assert verify_identity(bad, numerical=False).structural.tensor == (  # type: ignore[union-attr]
        "model.layers.4.post_attention_layernorm.weight"
    )
    report = verify_identity(bad, engine="transformers", structural=False)
    assert report.verdict == "different"
    assert (
        report.reason
        == "loading the expanded checkpoint: missing key model.layers.4.post_attention_layernorm.weight"
    )


# --- provenance and mapping ---------------------------------------------------------------------------


def test_other_tools_output_is_mapped_and_verified(demo: tuple[Path, Path], tmp_path: Path) -> None:
    base, out = demo
    other = without_provenance(out, tmp_path)
    result = cli("--out", other)
    assert result.exit_code == 3
    assert (
        result.stderr.splitlines()[0]
        == f"error: {other}: no llamapro.json, so the base checkpoint is unknown"
    )
    assert "--in" in result.stderr.splitlines()[1]
    result = cli("--in", base, "--out", other, "--engine", "native", "--json")
    assert result.exit_code == 0, result.stderr
    doc = as_json(result)
    assert doc["mapping"] == INFERRED and doc["new_layers"] == [4, 9] and doc["verdict"] == "identical"
    assert f"layer mapping {INFERRED} (new<-source: 4<-3, 9<-7)" in result.stderr


def test_inferred_mapping_finds_copies_of_earlier_layers(demo: tuple[Path, Path], tmp_path: Path) -> None:
    """`--copies 2` puts a copy of layer 2 after layer 3: matched by fingerprint, not taken for a copy of
    the layer just before it."""
    base = demo[0]
    expand(base, tmp_path / "pro", every=4, copies=2)
    other = without_provenance(tmp_path / "pro", tmp_path)
    report = verify_identity(other, base=base, numerical=False)
    assert (report.verdict, report.mapping, report.new_layers) == ("identical", INFERRED, (4, 5, 10, 11))
    assert f"layer mapping {INFERRED} (new<-source: 4<-2, 5<-3, 10<-6, 11<-7)" in report.warnings[0]


@pytest.mark.hf
def test_other_tools_output_with_transformers(
    expanded_tiny: Callable[..., tuple[Path, Path]], tmp_path: Path
) -> None:
    base, out = expanded_tiny("qwen3", "sliding")
    other = without_provenance(out, tmp_path)
    report = verify_identity(other, base=base, engine="transformers")
    assert (report.verdict, report.mapping, report.new_layers) == ("identical", INFERRED, (2, 5))


@pytest.mark.hf
def test_count_only_config_edit_is_caught(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    """What LLaMA-Factory's and mergekit's expansions do to a legacy Qwen2 config (only the layer count
    edited): transformers re-derives the sliding layers on the new indices and loads without a word."""
    import tiny_models

    base = tiny_model("qwen2", "sliding_legacy")
    naive = tiny_models.reference_expand(base, tmp_path / "naive", [1, 3], tiny_models.zero_residual_writers)
    result = cli("--in", base, "--out", naive)
    assert result.exit_code == 1
    assert (
        "config.json: layer_types gives layer 3 'sliding_attention', but its source (base layer 2) has "
        in (result.stderr)
    )
    numeric = verify_identity(naive, base=base, structural=False)
    assert numeric.verdict == "different" and numeric.full_max_abs is not None and numeric.full_max_abs > 0
    fixed = tiny_models.reference_expand(
        base,
        tmp_path / "fixed",
        [1, 3],
        tiny_models.zero_residual_writers,
        tiny_models.reference_config_edit([1, 3]),
    )
    assert verify_identity(fixed, base=base).verdict == "identical"


def test_no_consistent_mapping_exits_3(demo: tuple[Path, Path], tmp_path: Path) -> None:
    import torch

    base, out = demo
    other = without_provenance(out, tmp_path)
    for name in json.loads((out / "llamapro.json").read_text())["zeroed"]:
        edit_tensor(other, name, lambda t: torch.full_like(t, 1e-3))  # no layer is a zeroed copy any more
    result = cli("--in", base, "--out", other)
    assert result.exit_code == 3
    assert result.stderr.startswith(
        f"error: {other}: found 0 zeroed layers and 10 others, but the base has 8 layers; "
        "no consistent mapping"
    )
    assert result.stdout == ""


def test_same_layer_count_is_no_expansion(demo: tuple[Path, Path], tmp_path: Path) -> None:
    """What a trained model (trainers save no llamapro.json) checked against the model it was trained
    from looks like: as many layers, so no mapping to infer; the hint names the check that fits."""
    _, out = demo
    trained = without_provenance(out, tmp_path)
    result = cli("--in", out, "--out", trained)
    assert result.exit_code == 3 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: {trained} has as many layers as {out} (10), so it is not an expansion of it",
        f"hint: if it is {out} after training, check what training changed with: llamapro verify-frozen "
        f"--map {out} --trained {trained}",
    ]


def test_model_expanded_twice_verifies_against_its_grandparent(
    demo: tuple[Path, Path], tmp_path: Path
) -> None:
    base, pro = demo
    expand(pro, tmp_path / "pro-re", after=(0, 5))  # 10 -> 12 layers; its record nests pro's as parent
    result = cli("--in", base, "--out", tmp_path / "pro-re", "--engine", "native", "--json")
    assert result.exit_code == 0, result.stderr
    doc = as_json(result)
    assert (doc["mapping"], doc["num_layers_in"], doc["num_layers_out"]) == (
        "llamapro.json (2 expansions composed)", 8, 12,
    )  # fmt: skip
    # pro: 0 1 2 3 [3] 4 5 6 7 [7]; pro-re copies pro's layer 0 after it and pro's layer 5 (base 4).
    assert doc["new_layers"] == [1, 5, 7, 11] and doc["warnings"] == []
    parent = verify_identity(tmp_path / "pro-re", base=pro, numerical=False)
    assert (parent.mapping, parent.new_layers, parent.verdict) == ("llamapro.json", (1, 7), "identical")
    assert verify_identity(tmp_path / "pro-re", numerical=False).base == str(pro)  # the recorded source
    # A changed original layer is found against the grandparent too, named in its own terms.
    edit_tensor(tmp_path / "pro-re", "model.layers.9.mlp.up_proj.weight", lambda t: t * 2)
    report = verify_identity(tmp_path / "pro-re", base=base, numerical=False)
    assert report.verdict == "different" and report.reason == (
        "layer 9 (base layer 6): model.layers.9.mlp.up_proj.weight differs from "
        "model.layers.6.mlp.up_proj.weight in the base"
    )


def test_wrong_base_exits_3(demo: tuple[Path, Path]) -> None:
    result = cli("--in", demo[1], "--out", demo[1])  # a 10-layer base for an expansion of 8 layers
    assert result.exit_code == 3
    assert "is a 10-layer llama model, but" in result.stderr and "expanded from a 8-layer llama model" in (
        result.stderr
    )


def test_recorded_base_gone_exits_3(demo: tuple[Path, Path], tmp_path: Path) -> None:
    moved = copy_of(demo[1], tmp_path)
    record = json.loads((moved / "llamapro.json").read_text())
    record["source"]["path"] = str(tmp_path / "deleted")
    (moved / "llamapro.json").write_text(json.dumps(record))
    result = cli("--out", moved)
    assert result.exit_code == 3
    assert (
        "does not exist any more" in result.stderr
        and "hint: pass the base checkpoint with --in" in result.stderr
    )
    assert cli("--in", demo[0], "--out", moved, "--engine", "native").exit_code == 0


# --- options, inputs and the JSON contract ------------------------------------------------------------


def test_json_schema(demo: tuple[Path, Path]) -> None:
    result = cli(
        "--out", demo[1], "--engine", "native", "--tokens", "20", "--seed", "3", "--atol", "0.5", "--json"
    )
    assert result.exit_code == 0, result.stderr
    doc = as_json(result)
    assert set(doc) == REPORT_KEYS and doc["schema_version"] == 1
    assert doc["serving"] is None  # only a serving engine (vllm, llama.cpp, mlx) fills it
    assert set(doc["structural"]) == STRUCTURAL_KEYS
    assert (doc["tokens"], doc["prefill"], doc["decode_steps"], doc["seed"], doc["atol"]) == (
        20,
        12,
        8,
        3,
        0.5,
    )
    assert (doc["input"], doc["architecture"], doc["num_layers_in"], doc["num_layers_out"]) == (
        "random token ids", "llama", 8, 10,
    )  # fmt: skip
    assert (
        0 < doc["peak_bytes_loaded"] < 2_000_000
        and doc["peak_rss_bytes"] > 0
        and doc["peak_gpu_bytes"] is None
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tokens", "20", "--prompt", "hi"], "--tokens and --prompt exclude each other"),
        (["--atol", "-1"], "--atol must be zero or positive"),
        (["--engine", "bogus"], "--engine 'bogus' is not one of auto, transformers, native"),
        (["--dtype", "int8"], "--dtype 'int8' is not one of auto, float32, bfloat16, float16"),
        (["--tokens", "8"], "--tokens 8 leaves nothing to prefill"),
    ],
)
def test_usage_errors_exit_2(demo: tuple[Path, Path], args: list[str], message: str) -> None:
    result = cli("--out", demo[1], *args)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {message}") and result.stdout == ""


def test_without_transformers(demo: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a)
    )
    assert verify_identity(demo[1], tokens=12).engine == "native"  # auto falls back
    result = cli("--out", demo[1], "--engine", "transformers")
    assert result.exit_code == 3
    assert result.stderr == (
        "error: --engine transformers needs the transformers package\n"
        "hint: pip install 'llamapro-cli[hf]', or use --engine native\n"
    )


def test_cuda_missing_exits_3(demo: tuple[Path, Path]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    result = cli("--out", demo[1], "--device", "cuda")
    assert result.exit_code == 3 and "no CUDA device" in result.stderr and result.stdout == ""


def test_prompt_without_tokenizer_exits_3(demo: tuple[Path, Path]) -> None:
    result = cli("--out", demo[1], "--prompt", "def fib(n):")
    assert result.exit_code == 3
    assert "no tokenizer files" in result.stderr and "hint: use --tokens N" in result.stderr


@pytest.mark.hf
def test_prompt_through_the_tokenizer(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = copy_of(tiny_model("llama", "default"), tmp_path, "base")
    vocab = {"[UNK]": 0, **{chr(ord("a") + i): i + 1 for i in range(26)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(base)
    expand(base, tmp_path / "exp", every=3)  # the tokenizer is carried over
    result = cli("--out", tmp_path / "exp", "--prompt", " ".join("thequickbrownfox"), "--json")
    assert result.exit_code == 0, result.stderr
    doc = as_json(result)
    assert (doc["input"], doc["tokens"], doc["prefill"], doc["seed"]) == ("prompt", 16, 8, None)


@pytest.mark.hf
def test_tokens_are_capped_with_a_warning(
    expanded_tiny: Callable[..., tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, out = expanded_tiny("mistral")
    result = cli("--out", out, "--tokens", "100000", "--json")
    assert result.exit_code == 0, result.stderr
    assert as_json(result)["tokens"] == 248  # max_position_embeddings 256, minus 8 greedy tokens
    assert "warning: sequence capped at 248 tokens (asked for 100000): max_position_embeddings is 256" in (
        result.stderr
    )
    monkeypatch.setattr(tokens, "CPU_PARAM_TOKENS", 1.0)  # as if the model were huge
    report = verify_identity(out, engine="native")
    assert report.tokens == 9 and report.verdict == "identical"
    assert any("too slow on CPU" in w for w in report.warnings)
    assert any("does not exceed the sliding window (4 tokens)" in w for w in report.warnings)


@pytest.mark.hf
def test_switched_off_window_is_not_active(expanded_tiny: Callable[..., tuple[Path, Path]]) -> None:
    from llamapro_cli.checkpoint import Checkpoint

    assert tokens.active_window(Checkpoint.open(expanded_tiny("qwen2", "default")[1])) == 0
    assert tokens.active_window(Checkpoint.open(expanded_tiny("qwen2", "sliding_legacy")[1])) == WINDOW
    assert tokens.active_window(Checkpoint.open(expanded_tiny("mistral")[1])) == WINDOW


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["transformers", "native"])
def test_cuda(demo: tuple[Path, Path], engine: str) -> None:
    if engine == "transformers":
        pytest.importorskip("transformers")
    result = cli("--out", demo[1], "--device", "cuda", "--engine", engine, "--json")
    assert result.exit_code == 0, result.stderr
    doc = as_json(result)
    assert doc["device"] == "cuda" and doc["peak_gpu_bytes"] > 0 and doc["verdict"] == "identical"


# --- config keys and windows the checks must see ---------------------------------------------------

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


# --- progress: every phase, on a terminal or not -----------------------------------------------------


@pytest.mark.parametrize("engine", [pytest.param("transformers", marks=pytest.mark.hf), "native"])
def test_every_phase_reports_progress(
    demo: tuple[Path, Path], engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llamapro_cli.verify.progress import Phase, RunProgress

    phases: list[Phase] = []
    real = RunProgress.__call__

    def record(self: RunProgress, phase: Phase, done: int, total: int) -> None:
        if not phases or phases[-1] != phase:
            phases.append(phase)
        real(self, phase, done, total)

    monkeypatch.setattr(RunProgress, "__call__", record)
    seen: list[tuple[int, int]] = []
    report = verify_identity(demo[1], engine=engine, tokens=12, progress=lambda d, t: seen.append((d, t)))
    assert report.verdict == "identical"
    if engine == "native":
        assert phases == [Phase.STRUCTURAL, Phase.LOCKSTEP]
    else:
        assert phases == [
            Phase.STRUCTURAL, Phase.LOAD_BASE, Phase.RUN_BASE, Phase.LOAD_EXPANDED, Phase.RUN_EXPANDED,
        ]  # fmt: skip
    done = [d for d, _ in seen]
    assert len({t for _, t in seen}) == 1 and done == sorted(done) and done[-1] == seen[-1][1] > 0
    assert len(set(done)) > 20  # many steps, not a jump at the end


def test_a_silent_phase_still_shows_life(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from llamapro_cli.verify import progress

    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.01)
    seen: list[tuple[int, int]] = []
    run = progress.RunProgress(lambda d, t: seen.append((d, t)), [(progress.Phase.LOAD_BASE, 100)])
    run(progress.Phase.LOAD_BASE, 1, 4)
    with run.alive():
        time.sleep(0.2)  # as transformers loading a model: nothing reported from inside
    assert seen[0] == (25, 100) and len(seen) >= 3 and set(seen) == {(25, 100)}
    run(progress.Phase.LOAD_BASE, 0, 4)  # progress never goes back
    assert seen[-1] == (25, 100)


def test_progress_lines_on_a_pipe(demo: tuple[Path, Path]) -> None:
    """Not a terminal (CI, `2> log`): plain lines on stderr; LLAMAPRO_PROGRESS_INTERVAL=0 prints each
    update instead of one every ~10 s. stdout carries the report only."""
    import re
    import subprocess
    import sys

    env = {**os.environ, "LLAMAPRO_PROGRESS_INTERVAL": "0", "NO_COLOR": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "llamapro_cli", "verify-identity", "--out", str(demo[1]), "--tokens", "12"],
        capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("verdict: IDENTICAL\n") and "verify-identity:" not in proc.stdout
    line = re.compile(r"verify-identity: (\S+ [KMG]?B) of (\S+ [KMG]?B) \((\d+)%\), \d+ s")
    found = [line.fullmatch(text) for text in proc.stderr.splitlines()]
    assert found and all(found), proc.stderr
    percents = [int(m.group(3)) for m in found if m]
    assert len(set(percents)) > 10 and percents == sorted(percents) and percents[-1] == 100
