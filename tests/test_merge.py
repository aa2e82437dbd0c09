"""merge-adapter: PEFT LoRA adapters merged into a checkpoint byte-identically to PEFT's own merge.

The oracle is PEFT itself: `PeftModel.from_pretrained(model, adapter).merge_and_unload()` then
`save_pretrained`, with the model loaded in its stored dtype (transformers 5's default). Every tensor PEFT
writes must be byte-identical to ours, for bf16 and fp32 models, plain LoRA, lora_alpha, rsLoRA and DoRA,
modules_to_save. layer_replication adapters are materialised (loadable, each replica's weight equal to
PEFT's per-replica merge, logits close to PEFT's unmerged model); what llamapro does not reproduce
exactly is refused with exit 3 and no output.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from llamapro_cli.cli.app import app
from llamapro_cli.expand import expand
from llamapro_cli.merge import SCRATCH, merge_adapter
from llamapro_cli.provenance import Provenance

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.hf

NEW_LAYERS = [2, 5]  # demo (4 layers) expanded --every 2 -> 6 layers, copies at 2 and 5


@pytest.fixture(scope="module")
def expanded_bf16(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("merge") / "pro"
    expand(demo, out, every=2, digests=True)
    return out


@pytest.fixture(scope="module")
def new_layer_adapter(expanded_bf16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain adapter on the new layers of `expanded_bf16` (read-only for the tests)."""
    return make_adapter(
        expanded_bf16, tmp_path_factory.mktemp("adapter") / "a", layers_to_transform=NEW_LAYERS
    )


@pytest.fixture(scope="module")
def expanded_fp32(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("merge32") / "pro"
    expand(tiny_model("llama"), out, every=2)
    return out


def make_adapter(model_dir: Path, dest: Path, *, seed: int = 0, **lora: Any) -> Path:
    """Train-like random LoRA weights (B is non-zero), saved as PEFT saves them."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    config = peft.LoraConfig(
        **{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "o_proj", "down_proj"], **lora}
    )
    wrapped = peft.get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(wrapped.named_parameters()):
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
            elif "lora_" in name or "modules_to_save" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=gen).to(param.dtype))
    wrapped.save_pretrained(dest)
    return dest


def peft_merge(model_dir: Path, adapter: Path, dest: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(dest)
    tensors: dict[str, Any] = {}
    for file in sorted(dest.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def load_folder(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def same_bytes(a: Any, b: Any) -> bool:
    return bool(
        a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    )


CASES = {
    "lora": {},
    "alpha": {"lora_alpha": 16},
    "rslora": {"lora_alpha": 16, "use_rslora": True},
    "dora": {"use_dora": True},
    "modules_to_save": {"modules_to_save": ["lm_head"], "layers_to_transform": NEW_LAYERS},
}


@pytest.mark.parametrize(
    ("dtype", "case"),
    [("bf16", c) for c in CASES] + [("fp32", "lora"), ("fp32", "rslora"), ("fp32", "dora")],
)
def test_merge_is_byte_identical_to_peft(
    dtype: str, case: str, expanded_bf16: Path, expanded_fp32: Path, tmp_path: Path
) -> None:
    model = expanded_bf16 if dtype == "bf16" else expanded_fp32
    adapter = make_adapter(model, tmp_path / "adapter", **CASES[case])
    reference = peft_merge(model, adapter, tmp_path / "peft")
    report = merge_adapter(model, adapter, tmp_path / "ours")
    ours = load_folder(tmp_path / "ours")
    base = load_folder(model)
    assert set(ours) == set(base) and set(reference) <= set(ours)
    differ = [k for k in reference if not same_bytes(reference[k], ours[k])]
    assert not differ, f"{len(differ)} tensors differ from PEFT's merge, e.g. {differ[:3]}"
    changed = {k for k in base if not same_bytes(base[k], ours[k])}
    assert changed == set(report.merged) | set(report.replaced) and report.merged
    assert report.copied == len(base) - len(changed)
    assert not (tmp_path / "ours" / SCRATCH).exists()
    if case == "modules_to_save":
        assert report.replaced == ("lm_head.weight",)


def test_merged_model_records_the_adapter_and_passes_verify_frozen(
    expanded_bf16: Path, tmp_path: Path
) -> None:
    from llamapro_cli.freeze.audit import verify_frozen

    adapter = make_adapter(expanded_bf16, tmp_path / "adapter", layers_to_transform=NEW_LAYERS)
    merge_adapter(expanded_bf16, adapter, tmp_path / "merged")
    doc = json.loads((tmp_path / "merged" / "llamapro.json").read_text())
    record = doc["adapter"]
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    assert record["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert record["path"] == str(adapter.resolve()) and record["parent"] is None
    assert all(name.startswith(("model.layers.2.", "model.layers.5.")) for name in record["merged"])
    original = json.loads((expanded_bf16 / "llamapro.json").read_text())
    assert {k: v for k, v in doc.items() if k != "adapter"} == original
    assert Provenance.from_json(doc).to_json() == doc  # the typed record keeps the key
    report = verify_frozen(expanded_bf16, tmp_path / "merged")
    assert report.ok and report.unchanged_new_layers == ()
    # A second adapter on the merged model: the first record becomes the second one's parent.
    second = make_adapter(tmp_path / "merged", tmp_path / "adapter2", seed=1, layers_to_transform=[5])
    merge_adapter(tmp_path / "merged", second, tmp_path / "merged2")
    doc2 = json.loads((tmp_path / "merged2" / "llamapro.json").read_text())
    assert doc2["adapter"]["parent"] == record


def test_verify_frozen_fails_a_merge_that_adapted_original_layers(
    expanded_bf16: Path, tmp_path: Path
) -> None:
    from llamapro_cli.freeze.audit import verify_frozen

    adapter = make_adapter(expanded_bf16, tmp_path / "adapter", layers_to_transform=[0])
    merge_adapter(expanded_bf16, adapter, tmp_path / "merged")
    report = verify_frozen(expanded_bf16, tmp_path / "merged")
    assert not report.ok
    assert {c.name for c in report.changed} == {
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    }


def test_layer_replication_is_materialised(tiny_model: Any, tmp_path: Path) -> None:
    import tiny_models

    base = tiny_model("llama")  # 6 layers, fp32
    replication = [[0, 4], [2, 6]]  # -> base layers 0 1 2 3 2 3 4 5
    adapter = make_adapter(
        base, tmp_path / "adapter", layer_replication=replication, target_modules="all-linear"
    )
    report = merge_adapter(base, adapter, tmp_path / "merged")
    assert report.layer_map == (0, 1, 2, 3, 2, 3, 4, 5) and report.num_layers_out == 8
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["num_hidden_layers"] == 8
    assert not (tmp_path / "merged" / "llamapro.json").exists()
    merged = tiny_models.load_model(tmp_path / "merged")  # strict: no missing or unexpected keys
    unmerged = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    ).eval()
    ours = load_folder(tmp_path / "merged")
    # Each replica's weight is exactly PEFT's own per-module merge (W + get_delta_weight).
    for name, module in unmerged.named_modules():
        if isinstance(module, peft.tuners.lora.Linear):
            key = name.removeprefix("base_model.model.") + ".weight"
            expected = module.get_base_layer().weight.detach().clone()
            expected += module.get_delta_weight("default")
            assert same_bytes(expected, ours[key]), key
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = merged(ids).logits, unmerged(ids).logits
    # PEFT computes x W^T + (x A^T B^T) s unmerged and x (W + B A s)^T merged: rounding differs.
    delta = (a - b).abs().max().item()
    print(f"layer_replication: max |logit merged - PEFT unmerged| = {delta:.3g}")
    assert delta < 1e-4


def _adapter_config(adapter: Path, **changes: Any) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


REFUSED = {
    "fan_in_fan_out": {"fan_in_fan_out": True},
    "lora_bias": {"lora_bias": True},
    "pissa": {"init_lora_weights": "pissa"},
    "unknown_key": {"use_future_variant": {"x": 1}},
    "other_method": {"peft_type": "IA3"},
    "replication_dropping_layers": {"layer_replication": [[0, 2]]},
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_adapters_are_refused_without_output(
    case: str, expanded_bf16: Path, tmp_path: Path, new_layer_adapter: Path
) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(new_layer_adapter, adapter)
    _adapter_config(adapter, **REFUSED[case])
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    result = CliRunner().invoke(
        app,
        [
            "merge-adapter",
            "--model",
            str(expanded_bf16),
            "--adapter",
            str(adapter),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 3, result.output
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) <= 2
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o.partial-*"))
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before


def test_adapter_of_another_model_is_refused(
    expanded_bf16: Path, demo: Path, tmp_path: Path, new_layer_adapter: Path
) -> None:
    adapter = new_layer_adapter  # trained on 6 layers, its layer 5 is not in demo
    result = CliRunner().invoke(
        app, ["merge-adapter", "--model", str(demo), "--adapter", str(adapter), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 3 and "not a parameter of this model" in result.stderr
    assert not (tmp_path / "o").exists()


def test_pickled_adapter_is_refused(expanded_bf16: Path, tmp_path: Path, new_layer_adapter: Path) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(new_layer_adapter, adapter)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    result = CliRunner().invoke(
        app,
        [
            "merge-adapter",
            "--model",
            str(expanded_bf16),
            "--adapter",
            str(adapter),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 3 and "never unpickles" in result.stderr


def test_cli_merge_adapter_json(expanded_bf16: Path, tmp_path: Path, new_layer_adapter: Path) -> None:
    adapter = new_layer_adapter
    out = tmp_path / "merged"
    args = ["merge-adapter", "--model", str(expanded_bf16), "--adapter", str(adapter), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["out"] == str(out) and doc["merged"] and doc["layer_map"] is None and doc["provenance"] is True
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 4 and "already exists" in again.stderr
    forced = CliRunner().invoke(app, [*args, "--force"])
    assert forced.exit_code == 0 and "merged" in forced.stdout


def test_saved_module_in_another_dtype_is_converted_as_peft_loads_it(
    expanded_bf16: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    adapter = make_adapter(
        expanded_bf16, tmp_path / "adapter", modules_to_save=["lm_head"], layers_to_transform=[2]
    )
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    head = tensors["base_model.model.lm_head.weight"]
    noise = torch.randn(head.shape, generator=torch.Generator().manual_seed(3)) * 1e-4
    tensors["base_model.model.lm_head.weight"] = head.float() + noise  # fp32 values between bf16 steps
    save_file(tensors, str(weights), metadata={"format": "pt"})
    reference = peft_merge(expanded_bf16, adapter, tmp_path / "peft")
    merge_adapter(expanded_bf16, adapter, tmp_path / "ours")
    ours = load_folder(tmp_path / "ours")
    assert ours["lm_head.weight"].dtype == torch.bfloat16
    assert all(same_bytes(reference[k], ours[k]) for k in reference)
