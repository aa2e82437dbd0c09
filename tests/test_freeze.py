"""freeze-map and verify-frozen against the real thing: tiny transformers models expanded by our `expand`,
their real `named_parameters()`, each trainer's own matching rule (llamapro_cli/freeze/rules.py, ported from
the trainers' source) and PEFT itself.

Families come from tests/tiny_models.py: a new family there (MoE, multimodal prefixes) is tested here too.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

import tiny_models as tm
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D
from typer.testing import CliRunner

from llamapro_cli.cli.app import app
from llamapro_cli.cli.console import to_jsonable
from llamapro_cli.errors import InputError, UnsupportedError, UsageError
from llamapro_cli.expand import expand
from llamapro_cli.freeze import rules
from llamapro_cli.freeze.apply import ManifestMismatch, apply_freeze_map
from llamapro_cli.freeze.audit import verify_frozen
from llamapro_cli.freeze.manifest import load_manifest
from llamapro_cli.freeze.map import freeze_map
from llamapro_cli.freeze.snippet import Format, Snippet
from llamapro_cli.freeze.trainers import has_fused_experts, render

pytestmark = pytest.mark.hf

# (tiny_models family, variant): the core families, every layout; plus the tied-embeddings case.
CORE = [("llama", "default"), ("llama", "tied"), ("mistral", "default"), ("qwen2", "default"),
        ("qwen3", "default"), ("internlm3", "default")]  # fmt: skip
# Every other family of the zoo (MoE, multimodal prefixes, other layer prefixes): one layout each.
ZOO = [  # the first variant of every other registry family (falcon has no "default")
    (family, next(iter(tm.FAMILIES[family].variants)))
    for family in tm.FAMILIES
    if family not in {f for f, _ in CORE}
]
# Tiny models have 6 layers. LLaMA Pro layouts and explicit ones; which of them llama-factory can express.
LAYOUTS: dict[str, dict[str, Any]] = {
    "every2": {"every": 2},  # new 2, 5, 8 of 9: stride 3, expressible
    "every3": {"every": 3},  # new 3, 7 of 8: stride 4, expressible
    "every3x2": {"every": 3, "copies": 2},  # new 3, 4, 8, 9 of 10: K=4 does not divide 10
    "every1": {"every": 1},  # new 1, 3, ..., 11 of 12: a pattern without its trailing dot hits 10, 11
    "after": {"after": [0, 3, 3]},  # new 1, 5, 6 of 9: stride ids would be 2, 5, 8
    "every2x2": {"every": 2, "copies": 2},  # new 2, 3, 6, 7, 10, 11 of 12: keeps a period of 2 layers
}
# Families whose config fixes a layer period every3 would break get a layout that keeps it.
ZOO_LAYOUT = {"jamba": "every2x2"}
LLAMA_FACTORY_OK = {"every2", "every3", "every1"}
TRAINER_FORMATS = [Format.NAMES, Format.REGEX, Format.AXOLOTL, Format.LLAMA_FACTORY, Format.SWIFT, Format.HF]
runner = CliRunner()


class Case:
    """One expanded tiny model: its folder, new layers (from llamapro.json), the loaded model and its
    real parameter names (in order, with sizes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        record = json.loads((path / "llamapro.json").read_text())
        self.new = {x["index"] for x in record["layers"] if x["identity"]}
        self.num_layers = record["num_layers"]
        self.model = tm.load_model(path)
        self.named = [(n, p.numel()) for n, p in self.model.named_parameters()]
        self.names = [n for n, _ in self.named]
        self.prefix = _decoder_prefix(self.model, self.num_layers)

    def expected(self, also: tuple[str, ...] = ()) -> set[str]:
        """New-layer parameters by the model's own structure, plus the roles asked for."""
        layer = re.compile(rf"^{re.escape(self.prefix)}(\d+)\.")
        base = {n for n in self.names if (m := layer.match(n)) and int(m.group(1)) in self.new}
        return base | {n for role in also for n in _role_names(self.model)[role]}


def _decoder_prefix(model: Any, num_layers: int) -> str:
    """The in-memory prefix of the decoder layers: the one ModuleList holding `num_layers` modules."""
    stacks = [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == num_layers
    ]
    assert len(stacks) == 1, stacks
    return stacks[0] + "."


def _role_names(model: Any) -> dict[str, set[str]]:
    """Role -> parameter names, found through the model's modules (not llamapro's record)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {
        "embeddings": {by_id[id(model.get_input_embeddings().weight)]},
        "head": {by_id[id(model.get_output_embeddings().weight)]},
        "final-norm": {by_id[id(p)] for p in model.model.norm.parameters()},
    }


@pytest.fixture(scope="session")
def case(tiny_model: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Case]:
    cache: dict[tuple[str, str, str], Case] = {}

    def make(family: str, variant: str, layout: str) -> Case:
        key = (family, variant, layout)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"fm-{family}-{variant}-{layout}") / "pro"
            expand(tiny_model(family, variant), out, **LAYOUTS[layout])
            cache[key] = Case(out)
        return cache[key]

    return make


def selected(fmt: Format, text: str, c: Case) -> set[str]:
    """Apply the trainer's own rule (freeze/rules.py) to the snippet as a user would paste it."""
    if fmt is Format.NAMES:
        return set(text.split())
    if fmt is Format.REGEX:
        return rules.anchored_regex(text.strip(), c.names)
    if fmt is Format.AXOLOTL:
        return rules.axolotl(yaml.safe_load(text)["unfrozen_parameters"], c.names)
    if fmt is Format.LLAMA_FACTORY:
        return rules.llama_factory(yaml.safe_load(text), c.names, c.num_layers)
    if fmt is Format.SWIFT:
        return rules.swift(_swift_args(text), c.named)
    return _run_hf(text, c)


def _swift_args(text: str) -> dict[str, Any]:
    command = " ".join(line.rstrip("\\") for line in text.splitlines() if not line.startswith("#"))
    argv = shlex.split(command)
    assert argv[:2] == ["swift", "pt"], argv
    args: dict[str, Any] = {}
    key = None
    for token in argv[2:]:
        if token.startswith("--"):
            key = token[2:]
            args[key] = []
        else:
            assert key is not None
            args[key].append(token)
    single = {k: v[0] for k, v in args.items() if k != "trainable_parameters"}
    return {**single, "trainable_parameters": args["trainable_parameters"]}


def _run_hf(text: str, c: Case) -> set[str]:
    exec(compile(text, "<hf snippet>", "exec"), {"model": c.model})  # sets every flag: reuse is safe
    return {n for n, p in c.model.named_parameters() if p.requires_grad}


# --- every format selects exactly the new layers under its trainer's rule --------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize(("family", "variant"), CORE)
def test_each_format_selects_exactly_the_new_layers(
    case: Callable[..., Case], family: str, variant: str, layout: str
) -> None:
    c = case(family, variant, layout)
    fm = freeze_map(c.path)
    assert set(fm.new_layers) == c.new
    assert set(fm.trainable_parameters) == c.expected()
    assert set(fm.trainable_parameters) | set(fm.frozen_parameters) == set(c.names)
    for fmt in TRAINER_FORMATS:
        if fmt is Format.LLAMA_FACTORY and layout not in LLAMA_FACTORY_OK:
            with pytest.raises(UsageError, match="cannot express new layers"):
                render(fm, fmt)
            continue
        snippet = render(fm, fmt)
        assert selected(fmt, snippet.text, c) == c.expected(), fmt
        assert snippet.tensors == len(c.expected())
        assert snippet.parameters == sum(n for name, n in c.named if name in c.expected())


@pytest.mark.parametrize(
    ("family", "variant"), [("llama", "default"), ("llama", "tied"), ("qwen3", "default")]
)
def test_also_roles_under_each_trainer_rule(case: Callable[..., Case], family: str, variant: str) -> None:
    c = case(family, variant, "every3")
    for also in [("embeddings",), ("head",), ("embeddings", "head", "final-norm")]:
        fm = freeze_map(c.path, also=also)
        assert set(fm.trainable_parameters) == c.expected(also)
        for fmt in TRAINER_FORMATS:
            if fmt is Format.LLAMA_FACTORY and "final-norm" in also:
                # freeze_extra_modules "norm" is a substring of every layer's layernorm names.
                with pytest.raises(UsageError, match=r"would also train model\.layers\.0\.input_layernorm"):
                    render(fm, fmt)
                continue
            assert selected(fmt, render(fm, fmt).text, c) == c.expected(also), (fmt, also)
    tied_fm = freeze_map(c.path, also=["head"])
    if variant == "tied":
        assert "model.embed_tokens.weight" in tied_fm.trainable_parameters
        assert any("head is the embedding matrix" in n for n in tied_fm.notes)


@pytest.mark.parametrize("layout", ["every2", "every3x2", "after"])
@pytest.mark.parametrize(
    ("family", "variant"), [("llama", "default"), ("llama", "tied"), ("qwen2", "default")]
)
def test_peft_arguments_put_adapters_only_in_the_new_layers(
    case: Callable[..., Case], family: str, variant: str, layout: str
) -> None:
    c = case(family, variant, layout)
    check_peft(c, render(freeze_map(c.path), Format.PEFT))


def check_peft(c: Case, snippet: Snippet) -> None:
    """Run the snippet with PEFT itself (LoraConfig(**args), get_peft_model) on a fresh model: adapters
    on every linear module of the new layers and nowhere else; the counts in the comment are PEFT's."""
    from peft import LoraConfig

    model = tm.load_model(c.path)
    module_names = [n for n, _ in model.named_modules() if n]
    kinds = (torch.nn.Linear, Conv1D)  # PEFT adapts GPT-2's Conv1D like a Linear
    linear = {n for n, m in model.named_modules() if isinstance(m, kinds)}
    layer = re.compile(rf"{re.escape(c.prefix)}(\d+)\.")
    want = {n for n in linear if (m := layer.match(n)) and int(m.group(1)) in c.new}
    namespace: dict[str, Any] = {"model": model}
    exec(compile(snippet.text, "<peft snippet>", "exec"), namespace)
    assert isinstance(namespace["lora_config"], LoraConfig)
    peft_model = namespace["model"]
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    adapted = {re.sub(r"^base_model\.model\.|\.lora_[AB]\.default\.weight$", "", n) for n in trainable}
    assert trainable and all(".lora_" in n for n in trainable)
    assert adapted == want
    assert snippet.tensors == len(trainable)
    assert snippet.parameters == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    config = yaml.safe_load(json.dumps(namespace["lora_config"].to_dict(), default=list))
    assert rules.peft_lora_targets(config, module_names) == want


@pytest.mark.parametrize(("family", "variant"), ZOO)
def test_every_registry_family(case: Callable[..., Case], family: str, variant: str) -> None:
    """MoE (fused experts in memory), multimodal prefixes, other layer prefixes: the map's parameter
    names are the model's, and every format selects exactly the new layers under its trainer's rule."""
    layout = ZOO_LAYOUT.get(family, "every3")
    try:
        c = case(family, variant, layout)
    except (UnsupportedError, UsageError) as e:
        assert family not in ZOO_LAYOUT, f"{family} must be expandable with {layout}: {e.message}"
        pytest.skip(f"expand refuses {family} ({layout}): {e.message}")
    fm = freeze_map(c.path)
    assert fm.parameter_numel() == dict(c.named), "in-memory names or sizes differ from named_parameters()"
    assert set(fm.trainable_parameters) == c.expected()
    k, n = len(c.new), c.num_layers
    expressible = n % k == 0 and sorted(c.new) == list(range(n // k - 1, n, n // k))
    for fmt in TRAINER_FORMATS:
        if fmt is Format.LLAMA_FACTORY and not expressible:
            with pytest.raises(UsageError):
                render(fm, fmt)
            continue
        assert selected(fmt, render(fm, fmt).text, c) == c.expected(), fmt
    if has_fused_experts(fm) or any(n.endswith(".A_log") for n in c.names):
        with pytest.raises(UsageError, match=r"fused MoE experts|state-space"):
            render(fm, Format.PEFT)
    else:
        check_peft(c, render(fm, Format.PEFT))


def test_peft_modules_to_save_for_roles(case: Callable[..., Case]) -> None:
    c = case("llama", "default", "every3")
    snippet = render(freeze_map(c.path, also=["final-norm"]), Format.PEFT)
    namespace: dict[str, Any] = {"model": tm.load_model(c.path)}
    exec(compile(snippet.text, "<peft snippet>", "exec"), namespace)
    trainable = [n for n, p in namespace["model"].named_parameters() if p.requires_grad]
    saved = [n for n in trainable if ".lora_" not in n]
    assert saved == ["base_model.model.model.norm.modules_to_save.default.weight"]


# --- names / json round trips, text and CLI ------------------------------------------------------------


def test_names_and_json_round_trip(case: Callable[..., Case], tmp_path: Path) -> None:
    c = case("llama", "tied", "after")
    fm = freeze_map(c.path, also=["final-norm"])
    names = runner.invoke(app, ["freeze-map", str(c.path), "--format", "names", "--also", "final-norm"])
    assert names.exit_code == 0, names.stderr
    assert tuple(names.stdout.split()) == fm.trainable_parameters
    assert "trainable tensors" in names.stderr
    doc = runner.invoke(app, ["freeze-map", str(c.path), "--format", "json", "--also", "final-norm"])
    assert doc.exit_code == 0, doc.stderr
    assert load_manifest(json.loads(doc.stdout)) == fm
    (tmp_path / "map.json").write_text(doc.stdout)
    assert load_manifest(tmp_path / "map.json") == fm
    short = runner.invoke(app, ["freeze-map", str(c.path), "--json"])
    assert json.loads(short.stdout)["new_layers"] == [1, 5, 6]
    assert to_jsonable(fm)["schema_version"] == 1


def test_text_summary_and_usage_errors(case: Callable[..., Case], tiny_model: Callable[..., Path]) -> None:
    c = case("llama", "default", "every3x2")
    text = runner.invoke(app, ["freeze-map", str(c.path)])
    assert text.exit_code == 0
    assert "3<-1, 4<-2, 8<-4, 9<-5" in text.stdout and "llamapro.json" in text.stdout
    refused = runner.invoke(app, ["freeze-map", str(c.path), "--format", "llama-factory"])
    assert refused.exit_code == 2 and refused.stdout == ""
    assert refused.stderr.startswith("error: --format llama-factory cannot express new layers 3, 4, 8, 9")
    assert "hint: use --format axolotl, swift or hf" in refused.stderr
    for argv in (["--format", "yaml"], ["--also", "lm_head_bias"], ["--json", "--format", "hf"]):
        result = runner.invoke(app, ["freeze-map", str(c.path), *argv])
        assert result.exit_code == 2 and result.stderr.startswith("error: "), argv
    plain = runner.invoke(app, ["freeze-map", str(tiny_model("llama"))])
    assert plain.exit_code == 3 and "no new layers found" in plain.stderr


def test_new_layers_inferred_without_llamapro_json(case: Callable[..., Case], tmp_path: Path) -> None:
    c = case("llama", "default", "after")
    copy = shutil.copytree(c.path, tmp_path / "exp")
    (copy / "llamapro.json").unlink()
    fm = freeze_map(copy)
    assert set(fm.new_layers) == c.new and fm.sources is None
    assert fm.found_by == "inferred from zero branch-final tensors"
    assert any("keep this map" in n for n in fm.notes)
    assert set(render(fm, Format.AXOLOTL).selected) == c.expected()


# --- apply_freeze_map -----------------------------------------------------------------------------------


def test_apply_freeze_map_sets_requires_grad(
    case: Callable[..., Case], tiny_model: Callable[..., Path]
) -> None:
    c = case("llama", "tied", "every2")
    fm = freeze_map(c.path, also=["head"])
    model = tm.load_model(c.path)
    counts = apply_freeze_map(model, to_jsonable(fm))  # the parsed JSON works as well as the object
    on = {n for n, p in model.named_parameters() if p.requires_grad}
    assert on == c.expected(("head",))
    assert counts.trainable_tensors == len(on)
    assert counts.trainable_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts.frozen_tensors == len(c.names) - len(on)
    base = tm.load_model(tiny_model("llama", "tied"))  # 6 layers: the map's layers 6-8 are missing
    for p in base.parameters():
        p.requires_grad_(True)
    with pytest.raises(ManifestMismatch, match=r"the model has no parameter model\.layers\.8\..* of the map"):
        apply_freeze_map(base, fm)
    assert all(p.requires_grad for p in base.parameters()), "nothing may change before the error"


# --- verify-frozen ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pro(tiny_model: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A bf16 tiny Llama expanded with and without digests."""
    base = tiny_model("llama", dtype="bfloat16")
    root = tmp_path_factory.mktemp("frozen")
    expand(base, root / "digests", every=3, digests=True)
    expand(base, root / "plain", every=3)
    expand(base, root / "sharded", every=3, max_shard_size="100KB")
    return {"digests": root / "digests", "plain": root / "plain", "sharded": root / "sharded"}


def trained_copy(src: Path, dst: Path, *, touch: str = "o_proj", dtype: torch.dtype | None = None,
                 prefix: str = "", shards: int = 1, drop: tuple[str, ...] = ()) -> Path:  # fmt: skip
    """A 'trained' checkpoint: new layers' `touch` tensors moved, optionally re-typed/prefixed/re-sharded."""
    new = {x["index"] for x in json.loads((src / "llamapro.json").read_text())["layers"] if x["identity"]}
    state = {k: v for f in sorted(src.glob("*.safetensors")) for k, v in load_file(f).items()}
    out = {}
    for name, t in state.items():
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m and int(m.group(1)) in new and touch in name:
            t = t + 0.01
        if name not in drop:
            out[prefix + name] = (t.to(dtype) if dtype else t).contiguous()
    dst.mkdir(parents=True)
    names = list(out)
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)] if shards > 1 else []
    if not files:
        save_file(out, dst / "model.safetensors")
        return dst
    weight_map = {n: files[i * shards // len(names)] for i, n in enumerate(names)}
    for f in files:
        save_file({n: out[n] for n in names if weight_map[n] == f}, dst / f)
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def flip_one_byte(folder: Path, name: str) -> None:
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    size = struct.unpack("<Q", data[:8])[0]
    begin = json.loads(data[8 : 8 + size])[name]["data_offsets"][0]
    data[8 + size + begin + 1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("ref", ["digests", "plain"])
def test_only_new_layers_changed_passes(pro: dict[str, Path], tmp_path: Path, ref: str) -> None:
    trained = trained_copy(pro[ref], tmp_path / "t")
    report = verify_frozen(pro[ref], trained)
    assert report.ok and not report.changed and not report.missing
    assert report.reference.startswith("sha256" if ref == "digests" else "the expanded")
    assert report.frozen_checked == report.frozen_unchanged > 0
    assert report.trainable_changed == 2 and not report.unchanged_new_layers and not report.warnings
    result = runner.invoke(app, ["verify-frozen", "--map", str(pro[ref]), "--trained", str(trained)])
    assert result.exit_code == 0 and "PASS" in result.stdout


@pytest.mark.parametrize("ref", ["digests", "plain"])
def test_one_changed_byte_of_a_frozen_tensor_fails(pro: dict[str, Path], tmp_path: Path, ref: str) -> None:
    trained = trained_copy(pro[ref], tmp_path / "t")
    flip_one_byte(trained, "model.layers.2.mlp.up_proj.weight")
    result = runner.invoke(app, ["verify-frozen", "--map", str(pro[ref]), "--trained", str(trained)])
    assert result.exit_code == 1
    assert "changed: model.layers.2.mlp.up_proj.weight (values differ)" in result.stdout
    assert result.stderr.startswith("error: frozen tensors changed: 1, missing: 0: model.layers.2.mlp.up")


def test_resharded_retyped_prefixed_checkpoint(pro: dict[str, Path], tmp_path: Path) -> None:
    trained = trained_copy(pro["digests"], tmp_path / "t", dtype=torch.float32, prefix="base_model.model.",
                           shards=3)  # fmt: skip
    report = verify_frozen(pro["digests"], trained)
    assert report.ok and report.trained_files == 3
    assert report.stripped_prefixes == ("base_model.model.",)
    frozen = [r for r in report.retyped if not r.trainable]
    assert frozen and all(r.exact and (r.dtype, r.trained_dtype) == ("BF16", "F32") for r in frozen)
    assert report.trainable_changed == 2
    doc = runner.invoke(
        app, ["verify-frozen", "--map", str(pro["digests"]), "--trained", str(trained), "--json"]
    )
    assert doc.exit_code == 0 and json.loads(doc.stdout)["ok"] is True


def test_sharded_expansion_compared_byte_for_byte(pro: dict[str, Path], tmp_path: Path) -> None:
    assert len(list(pro["sharded"].glob("*.safetensors"))) > 2
    trained = trained_copy(pro["sharded"], tmp_path / "t")  # one file against many shards
    report = verify_frozen(pro["sharded"], trained)
    assert report.ok and report.reference == "the expanded checkpoint's bytes"
    flip_one_byte(trained, "model.embed_tokens.weight")
    assert [c.name for c in verify_frozen(pro["sharded"], trained).changed] == ["model.embed_tokens.weight"]


def test_fp32_copy_with_a_value_bf16_cannot_hold_fails(pro: dict[str, Path], tmp_path: Path) -> None:
    trained = trained_copy(pro["plain"], tmp_path / "t", dtype=torch.float32)
    state = load_file(trained / "model.safetensors")
    state["model.norm.weight"][3] += 1e-6  # below bf16 resolution: not representable in the original dtype
    save_file(state, trained / "model.safetensors")
    report = verify_frozen(pro["plain"], trained)
    assert not report.ok
    assert [c.name for c in report.changed] == ["model.norm.weight"]
    assert "not all representable in BF16" in report.changed[0].reason


def test_missing_frozen_tensor_and_unchanged_new_layers(pro: dict[str, Path], tmp_path: Path) -> None:
    trained = trained_copy(
        pro["digests"], tmp_path / "t", touch="nothing", drop=("model.layers.0.mlp.up_proj.weight",)
    )
    report = verify_frozen(pro["digests"], trained)
    assert not report.ok and report.missing == ("model.layers.0.mlp.up_proj.weight",)
    assert report.unchanged_new_layers == (3, 7)
    assert any("did training run?" in w for w in report.warnings)
    result = runner.invoke(app, ["verify-frozen", "--map", str(pro["digests"]), "--trained", str(trained)])
    assert result.exit_code == 1 and "missing: model.layers.0.mlp.up_proj.weight" in result.stdout
    assert "warning: no tensor of the new layers changed: did training run?" in result.stderr


def test_tied_head_is_not_missing(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    base = shutil.copytree(tiny_model("llama", "tied"), tmp_path / "base")
    state = load_file(base / "model.safetensors")  # some hub checkpoints store the tied head anyway
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, base / "model.safetensors", metadata={"format": "pt"})
    expand(base, tmp_path / "pro", every=3, digests=True)
    fm = freeze_map(tmp_path / "pro")
    assert "lm_head.weight" in fm.frozen and "lm_head.weight" not in fm.frozen_parameters
    trained = trained_copy(tmp_path / "pro", tmp_path / "t", drop=("lm_head.weight",))
    assert verify_frozen(fm, trained).ok


def test_manifest_map_without_the_expanded_checkpoint(pro: dict[str, Path], tmp_path: Path) -> None:
    moved = shutil.copytree(pro["digests"], tmp_path / "pro")
    manifest = tmp_path / "map.json"
    manifest.write_text(runner.invoke(app, ["freeze-map", str(moved), "--format", "json"]).stdout)
    trained = trained_copy(moved, tmp_path / "t")
    shutil.rmtree(moved)  # the digests are enough
    assert verify_frozen(manifest, trained).ok
    plain = tmp_path / "plain.json"
    plain.write_text(runner.invoke(app, ["freeze-map", str(pro["plain"]), "--format", "json"]).stdout)
    assert verify_frozen(plain, trained).reference == "the expanded checkpoint's bytes"
    with pytest.raises(UsageError):
        verify_frozen(manifest, trained, also=["embeddings"])
    with pytest.raises(InputError, match="not a llamapro freeze-map manifest"):
        verify_frozen(pro["digests"] / "llamapro.json", trained)


def test_real_training_step_changes_only_new_layers(pro: dict[str, Path], tmp_path: Path) -> None:
    """End to end: load, apply the map, one AdamW step, save_pretrained (fp32), verify-frozen."""
    model = tm.load_model(pro["digests"], dtype=torch.float32)
    apply_freeze_map(model, freeze_map(pro["digests"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.save_pretrained(tmp_path / "trained")
    report = verify_frozen(pro["digests"], tmp_path / "trained")
    assert report.ok and report.frozen_unchanged == report.frozen_checked
    assert report.trainable_changed > 0 and not report.unchanged_new_layers


def test_in_place_training_without_digests_is_refused(pro: dict[str, Path], tmp_path: Path) -> None:
    """Without digests the expanded folder is the reference: a trainer that saved into it overwrote it,
    and comparing it with itself would pass whatever changed. With digests the audit still works."""
    plain = tmp_path / "plain"
    shutil.copytree(pro["plain"], plain)
    flip_one_byte(plain, "model.layers.2.mlp.up_proj.weight")  # "training" that broke a frozen tensor
    for target in (plain, plain / "model.safetensors"):
        result = runner.invoke(app, ["verify-frozen", "--map", str(plain), "--trained", str(target)])
        assert result.exit_code == 2, result.stderr
        assert result.stderr.startswith("error: --trained") and "no digests" in result.stderr
    digests = tmp_path / "digests"
    shutil.copytree(pro["digests"], digests)
    flip_one_byte(digests, "model.layers.2.mlp.up_proj.weight")
    result = runner.invoke(app, ["verify-frozen", "--map", str(digests), "--trained", str(digests)])
    assert result.exit_code == 1 and "model.layers.2.mlp.up_proj.weight" in result.stdout


# --- tied embeddings and heads in a trained checkpoint ---------------------------------------------


@pytest.mark.hf
def test_changed_head_of_a_tied_model_is_not_an_extra(
    tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    """A tied expansion stores no head: a trained checkpoint that does (the trainer untied it) must hold the
    frozen embedding matrix there, or the frozen head changed."""
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
def test_tied_weights_saved_under_the_head_name_stand_for_the_embeddings(
    tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    """safetensors' save_model keeps one name per shared tensor, the first in sort order: a tied model's
    matrix is then saved as lm_head.weight only. It is the embedding matrix, not a missing tensor."""
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
