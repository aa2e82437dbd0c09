"""freeze-map --check: a user's own trainer config, read as that trainer reads it, against the freeze map.

Config files are written the way each trainer's documentation shows them (LLaMA-Factory's
examples/train_freeze YAML, Axolotl's YAML, the adapter_config.json PEFT saves, an ms-swift command line
or args.json), for an expanded 10-layer demo (new layers 4 and 9): exit 0 when the config trains exactly
the new layers, 1 with the difference, 3 when the file cannot be read or asks for something llamapro
does not port. PEFT, which is installed here, is the oracle for its own target matching.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from llamapro_cli.cli.app import app
from llamapro_cli.expand import expand
from llamapro_cli.freeze.check import check_trainer_config, model_names
from llamapro_cli.freeze.check_trainers import select_peft
from llamapro_cli.freeze.map import freeze_map

LF_HEADER = """\
### model
model_name_or_path: {pro}
trust_remote_code: true

### method
stage: pt
do_train: true
"""
LF_FOOTER = """
### dataset
dataset: c4_demo
cutoff_len: 2048
max_samples: 1000
preprocessing_num_workers: 16

### output
output_dir: saves/pro/freeze/pt
logging_steps: 10
save_steps: 500

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
"""
AXOLOTL_HEADER = """\
base_model: {pro}
datasets:
  - path: mhenrichsen/alpaca_2k_test
    type: alpaca
val_set_size: 0.05
output_dir: ./outputs/pro
sequence_len: 2048
sample_packing: true
micro_batch_size: 2
gradient_accumulation_steps: 4
num_epochs: 1
optimizer: adamw_torch_fused
learning_rate: 0.0002
bf16: auto
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: false
"""


@pytest.fixture(scope="module")
def pro(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 8-layer demo expanded --every 4: 10 layers, new layers 4 and 9."""
    out = tmp_path_factory.mktemp("check") / "pro"
    demo8 = tmp_path_factory.mktemp("demo8") / "demo"
    from llamapro_cli.demo import write_demo_checkpoint

    write_demo_checkpoint(demo8, layers=8)
    expand(demo8, out, every=4)
    return out


def _write(tmp_path: Path, name: str, text: str, pro: Path) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).replace("{pro}", str(pro)))
    return path


def _cli(pro: Path, config: Path, *extra: str) -> Any:
    return CliRunner().invoke(app, ["freeze-map", str(pro), "--check", str(config), *extra])


# --- LLaMA-Factory -----------------------------------------------------------------------------------

LF_METHODS = {
    "freeze_llama_pro": ("finetuning_type: freeze\nfreeze_trainable_layers: 2\nuse_llama_pro: true\n", 0),
    "freeze_last_layers": ("finetuning_type: freeze\nfreeze_trainable_layers: 2\n", 1),
    "freeze_wrong_count": ("finetuning_type: freeze\nfreeze_trainable_layers: 5\nuse_llama_pro: true\n", 1),
    "freeze_not_dividing": ("finetuning_type: freeze\nfreeze_trainable_layers: 3\nuse_llama_pro: true\n", 1),
    "lora_llama_pro": (
        "finetuning_type: lora\nlora_target: all\nfreeze_trainable_layers: 2\nuse_llama_pro: true\n",
        0,
    ),
    "lora_everywhere": ("finetuning_type: lora\nlora_target: all\n", 1),
    "full": ("finetuning_type: full\n", 1),
    "extra_module": (
        "finetuning_type: freeze\nfreeze_trainable_layers: 2\nuse_llama_pro: true\n"
        "freeze_extra_modules: embed_tokens\n",
        1,
    ),
}


@pytest.mark.parametrize("case", sorted(LF_METHODS))
def test_llama_factory_configs(case: str, pro: Path, tmp_path: Path) -> None:
    method, code = LF_METHODS[case]
    config = _write(tmp_path, "pro_sft.yaml", LF_HEADER + method + LF_FOOTER, pro)
    result = _cli(pro, config)
    assert result.exit_code == code, result.output
    report = check_trainer_config(pro, config)
    assert report.trainer == "llama-factory" and report.agrees is (code == 0)
    if case == "freeze_last_layers":  # the last 2 layers: original layer 8 and new layer 9
        assert report.original_layers_trained == (8,) and report.new_layers_left_frozen == (4,)
    if case == "freeze_wrong_count":  # stride 2: layers 1, 3, 5, 7, 9
        assert report.original_layers_trained == (1, 3, 5, 7) and report.new_layers_left_frozen == (4,)
    if case == "freeze_not_dividing":
        assert "should be divisible" in (report.refused or "") and "would refuse" in result.stderr
    if case == "lora_llama_pro":
        assert report.method == "lora" and report.adapted_modules == 14 and report.new_layers_partly == ()
    if case == "full":
        assert report.original_layers_trained == tuple(i for i in range(10) if i not in (4, 9))
    if case == "extra_module":
        assert report.other_trained == ("model.embed_tokens.weight",)
        also = check_trainer_config(pro, config, also=["embeddings"])
        assert also.agrees and _cli(pro, config, "--also", "embeddings").exit_code == 0
    assert report.unknown_keys == ()  # every key of the documented example is known


def test_llama_factory_json_and_unknown_keys(pro: Path, tmp_path: Path) -> None:
    config = tmp_path / "args.json"
    doc = {"model_name_or_path": str(pro), "stage": "pt", "finetuning_type": "freeze", "use_llama_pro": True,
           "freeze_trainable_layers": 2, "my_new_option": 1}  # fmt: skip
    config.write_text(json.dumps(doc))
    result = _cli(pro, config, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["agrees"] is True and report["unknown_keys"] == ["my_new_option"]
    assert "my_new_option" in result.stderr


def test_unported_option_makes_the_check_refuse(pro: Path, tmp_path: Path) -> None:
    method = "finetuning_type: freeze\nfreeze_trainable_layers: 2\nuse_llama_pro: true\nuse_badam: true\n"
    result = _cli(pro, _write(tmp_path, "c.yaml", LF_HEADER + method, pro))
    assert result.exit_code == 3 and "use_badam" in result.stderr and "does not port" in result.stderr


# --- Axolotl -----------------------------------------------------------------------------------------


def test_axolotl_snippet_agrees(pro: Path, tmp_path: Path) -> None:
    snippet = CliRunner().invoke(app, ["freeze-map", str(pro), "--format", "axolotl"]).stdout
    config = _write(tmp_path, "pro.yml", AXOLOTL_HEADER, pro)
    config.write_text(
        config.read_text().replace("gradient_checkpointing_kwargs:\n  use_reentrant: false\n", "") + snippet
    )
    result = _cli(pro, config)
    assert result.exit_code == 0, result.output
    assert check_trainer_config(pro, config).trainer == "axolotl"


AXOLOTL_CASES = {
    # escaped dots: Axolotl escapes them again, so the pattern matches nothing (axolotl#3586)
    "escaped_dots": ("unfrozen_parameters:\n  - ^model\\.layers\\.4\\..*\n  - model.layers.9.\n", 1),
    "lora_new_layers": (
        "adapter: lora\nlora_r: 16\nlora_alpha: 32\nlora_target_linear: true\n"
        "peft_layers_to_transform: [4, 9]\npeft_layers_pattern: [layers]\n",
        0,
    ),
    "lora_everywhere": ("adapter: lora\nlora_r: 16\nlora_target_linear: true\n", 1),
    "full_fine_tune": ("", 1),
}


@pytest.mark.parametrize("case", sorted(AXOLOTL_CASES))
def test_axolotl_configs(case: str, pro: Path, tmp_path: Path) -> None:
    body, code = AXOLOTL_CASES[case]
    config = _write(tmp_path, "pro.yml", AXOLOTL_HEADER + body, pro)
    result = _cli(pro, config)
    assert result.exit_code == code, result.output
    report = check_trainer_config(pro, config)
    if case == "escaped_dots":
        assert report.unmatched == ("unfrozen_parameters: ^model\\.layers\\.4\\..*",)
        assert report.new_layers_left_frozen == (4,) and report.new_layers_trained == (9,)
    if case == "lora_everywhere":
        assert len(report.original_layers_trained) == 8


# --- PEFT (the oracle for its own matching) -----------------------------------------------------------

PEFT_CASES: dict[str, tuple[dict[str, Any], int]] = {
    "new_layers": (
        {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
         "layers_to_transform": [4, 9], "layers_pattern": "layers"},
        0,
    ),
    "attention_only": ({"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [4, 9]}, 0),
    "all_linear": ({"target_modules": "all-linear"}, 1),
    "regex": ({"target_modules": r"model\.layers\.(4|9)\.mlp\.(gate|up|down)_proj"}, 0),
    "wrong_layers": (
        {"target_modules": ["q_proj"], "layers_to_transform": [4, 8], "layers_pattern": "layers"}, 1
    ),
    "typo": ({"target_modules": ["q_proj", "qproj"], "layers_to_transform": [4, 9]}, 1),
    "save_head": (
        {"target_modules": ["q_proj"], "layers_to_transform": [4, 9], "modules_to_save": ["lm_head"]}, 1
    ),
}  # fmt: skip


@pytest.mark.hf
@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_adapter_configs_match_peft_itself(case: str, pro: Path, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    kwargs, code = PEFT_CASES[case]
    model = transformers.AutoModelForCausalLM.from_pretrained(pro)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, **kwargs))
    wrapped.save_pretrained(tmp_path / "adapter")
    config = tmp_path / "adapter" / "adapter_config.json"
    result = _cli(pro, config)
    assert result.exit_code == code, result.output
    report = check_trainer_config(pro, config)
    assert report.trainer == "peft"
    adapted = {
        n.removeprefix("base_model.model.")
        for n, m in wrapped.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    ours = select_peft(json.loads(config.read_text()), model_names(freeze_map(pro)))
    assert set(ours.adapted) == adapted
    if case == "wrong_layers":
        assert report.original_layers_trained == (8,) and report.new_layers_left_frozen == (9,)
    if case == "typo":
        assert report.unmatched == ("target_modules: qproj",)
    if case == "save_head":
        assert report.other_trained == ("lm_head.weight",)


def test_layer_replication_adapter_cannot_be_checked(pro: Path, tmp_path: Path) -> None:
    config = tmp_path / "adapter_config.json"
    config.write_text(
        json.dumps({"peft_type": "LORA", "target_modules": ["q_proj"], "layer_replication": [[0, 6]]})
    )
    result = _cli(pro, config)
    assert result.exit_code == 3 and "layer_replication" in result.stderr


# --- ms-swift ------------------------------------------------------------------------------------------


def test_swift_snippet_agrees(pro: Path, tmp_path: Path) -> None:
    snippet = CliRunner().invoke(app, ["freeze-map", str(pro), "--format", "swift"]).stdout
    config = _write(tmp_path, "train.sh", snippet, pro)
    assert _cli(pro, config).exit_code == 0


SWIFT_CASES = {
    "no_dot": ("swift sft --model {pro} --tuner_type full --freeze_parameters_ratio 1 "
               "--trainable_parameters model.layers.4 model.layers.9", 0),
    "full": ("CUDA_VISIBLE_DEVICES=0 swift sft --model {pro} --tuner_type full --dataset x", 1),
    "llamapro_tuner": ("swift pt --model {pro} --tuner_type llamapro --llamapro_num_new_blocks 2", 1),
    "lora_default": ("swift sft \\\n  --model {pro} \\\n  --tuner_type lora \\\n  --lora_rank 8", 1),
    "ratio": ("swift sft --model {pro} --tuner_type full --freeze_parameters_ratio 0.5", 3),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(SWIFT_CASES))
def test_swift_command_lines(case: str, pro: Path, tmp_path: Path) -> None:
    text, code = SWIFT_CASES[case]
    result = _cli(pro, _write(tmp_path, "train.sh", text + "\n", pro))
    assert result.exit_code == code, result.output
    if case == "llamapro_tuner":
        assert "expands the model again" in result.stderr


def test_swift_args_json(pro: Path, tmp_path: Path) -> None:
    config = tmp_path / "args.json"
    args = {
        "model": str(pro),
        "tuner_type": "full",
        "freeze_parameters_ratio": 1.0,
        "trainable_parameters": ["model.layers.4.", "model.layers.9."],
        "learning_rate": 1e-5,
    }
    config.write_text(json.dumps(args))
    assert _cli(pro, config).exit_code == 0


# --- files that cannot be checked ----------------------------------------------------------------------

UNREADABLE = {
    "bad_yaml": "finetuning_type: [freeze\n",
    "not_a_mapping": "- a\n- b\n",
    "python_tag": "finetuning_type: !!python/object/apply:os.system ['touch {pro}/pwned']\n",
    "unknown_trainer": "colour: blue\nsize: 3\n",
}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_unreadable_configs_exit_3(case: str, pro: Path, tmp_path: Path) -> None:
    result = _cli(pro, _write(tmp_path, "c.yaml", UNREADABLE[case], pro))
    assert result.exit_code == 3, result.output
    assert result.stderr.startswith("error: --check") and len(result.stderr.splitlines()) <= 2
    assert not (pro / "pwned").exists()


def test_binary_and_missing_files_exit_3(pro: Path, tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_bytes(b"\xff\xfe\x00binary")
    assert _cli(pro, tmp_path / "b.yaml").exit_code == 3
    assert _cli(pro, tmp_path / "missing.yaml").exit_code == 3


def test_check_conflicts_with_a_format(pro: Path, tmp_path: Path) -> None:
    config = _write(tmp_path, "c.yaml", LF_HEADER + "finetuning_type: full\n", pro)
    result = _cli(pro, config, "--format", "axolotl")
    assert result.exit_code == 2 and "--check conflicts" in result.stderr
