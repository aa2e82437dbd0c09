"""The LLaMA-Factory port (`freeze/rules.py`, `freeze/check_trainers.py`) against LLaMA-Factory's own code.

Opt-in: `make test-trainers` builds `.venv-trainers` with llamafactory 0.9.5 (torch pinned) and runs this
file; elsewhere it is skipped. The same tiny expanded model is loaded with transformers and handed to
LLaMA-Factory's `init_adapter` for freeze and LoRA configs; the parameters it leaves trainable (freeze) or
the modules it gives adapters (LoRA) must be exactly what `freeze-map --check` predicts for the same
config, including its refusals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llamapro_cli.expand import expand
from llamapro_cli.freeze.check import model_names
from llamapro_cli.freeze.check_trainers import select_llama_factory
from llamapro_cli.freeze.map import freeze_map

pytestmark = pytest.mark.trainers
llamafactory = pytest.importorskip("llamafactory")

CONFIGS: dict[str, dict[str, Any]] = {
    "freeze_llama_pro": {"finetuning_type": "freeze", "freeze_trainable_layers": 2, "use_llama_pro": True},
    "freeze_last": {"finetuning_type": "freeze", "freeze_trainable_layers": 2},
    "freeze_first": {"finetuning_type": "freeze", "freeze_trainable_layers": -3},
    "freeze_modules": {
        "finetuning_type": "freeze",
        "freeze_trainable_layers": 2,
        "use_llama_pro": True,
        "freeze_trainable_modules": "mlp,self_attn",
        "freeze_extra_modules": "embed_tokens,norm",
    },
    "freeze_stride_5": {"finetuning_type": "freeze", "freeze_trainable_layers": 5, "use_llama_pro": True},
    "freeze_not_dividing": {"finetuning_type": "freeze", "freeze_trainable_layers": 3, "use_llama_pro": True},
    "lora_llama_pro": {
        "finetuning_type": "lora",
        "lora_target": "all",
        "freeze_trainable_layers": 2,
        "use_llama_pro": True,
    },
    "lora_targets": {
        "finetuning_type": "lora",
        "lora_target": "q_proj,v_proj",
        "additional_target": "lm_head",
    },
}


@pytest.fixture(scope="module")
def pro(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llamapro_cli.demo import write_demo_checkpoint

    base = write_demo_checkpoint(tmp_path_factory.mktemp("base") / "demo", layers=8)
    out = tmp_path_factory.mktemp("pro") / "pro"
    expand(base, out, every=4)  # 10 layers, new layers 4 and 9
    return out


def _llama_factory(pro: Path, config: dict[str, Any]) -> tuple[str, set[str]]:
    """("freeze"/"lora", trainable parameter names or adapted module names) by LLaMA-Factory itself."""
    import transformers
    from llamafactory.hparams import FinetuningArguments, ModelArguments
    from llamafactory.model.adapter import init_adapter

    model = transformers.AutoModelForCausalLM.from_pretrained(pro)
    args = FinetuningArguments(**config)
    model_args = ModelArguments(model_name_or_path=str(pro))
    wrapped = init_adapter(model.config, model, model_args, args, is_trainable=True)
    if config["finetuning_type"] == "lora":
        import peft

        modules = {
            name.removeprefix("base_model.model.")
            for name, module in wrapped.named_modules()
            if isinstance(module, peft.tuners.lora.LoraLayer)
        }
        return "lora", modules
    return "freeze", {n for n, p in wrapped.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_llama_factory_port_matches_llama_factory(case: str, pro: Path) -> None:
    config = CONFIGS[case]
    ours = select_llama_factory(config, model_names(freeze_map(pro)))
    try:
        method, theirs = _llama_factory(pro, config)
    except (ValueError, ZeroDivisionError) as e:
        assert ours.refused is not None, f"LLaMA-Factory raised ({e}) but the port did not"
        return
    assert ours.refused is None, f"the port refuses ({ours.refused}) but LLaMA-Factory does not"
    if method == "lora":
        assert set(ours.adapted) == theirs
    else:
        assert set(ours.trainable) == theirs
