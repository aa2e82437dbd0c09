"""`freeze-map EXPANDED --check TRAINER_CONFIG`: will the user's own trainer config train the new layers?

`check_trainer_config(expanded, path)` reads the user's file (bounded; JSON, YAML through
`yaml.safe_load` only, or an ms-swift command line), recognises the trainer by its keys (LLaMA-Factory,
Axolotl, a PEFT `adapter_config.json`, ms-swift arguments), applies that trainer's own selection rule
(`check_trainers.py` over `rules.py`) to the expanded checkpoint's in-memory parameter names, and compares
the result with the freeze map: new layers the config leaves frozen, original layers it trains, other
tensors it trains (or `--also` tensors it misses), config entries that match no name, and the trainer's
own refusal. Keys it does not know are listed, never interpreted.

Invariant: the verdict (`agrees`) is exactly "no difference of those kinds"; a key that changes what the
trainer trains and that llamapro does not port makes the check refuse (exit 3) instead of guessing.
Must not: execute anything from the file; print; choose exit codes.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from llamapro_cli.architectures.families import FAMILIES
from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.errors import InputError
from llamapro_cli.freeze import check_trainers as ct
from llamapro_cli.freeze.map import FreezeMap, freeze_map, memory_name

MAX_CONFIG_SIZE = 4 * 1024 * 1024


class Trainer(StrEnum):
    LLAMA_FACTORY = "llama-factory"
    AXOLOTL = "axolotl"
    PEFT = "peft"
    SWIFT = "swift"


RULES = {
    Trainer.LLAMA_FACTORY: "LLaMA-Factory 0.9.5 model/adapter.py (_setup_freeze_tuning, _setup_lora_tuning)",
    Trainer.AXOLOTL: "Axolotl utils/freeze.py (LayerNamePattern) and load_lora (PEFT's target matching)",
    Trainer.PEFT: "PEFT 0.21 tuners/tuners_utils.py::check_target_module_exists",
    Trainer.SWIFT: "ms-swift v4 utils/transformers_utils.py (freeze_parameters, activate_parameters)",
}
# Keys that tell the trainers apart (a file is the trainer with the most of them).
SIGNATURES = {
    Trainer.LLAMA_FACTORY: {
        "finetuning_type", "freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules",
        "use_llama_pro", "lora_target", "additional_target", "stage", "template", "cutoff_len", "do_train",
        "model_name_or_path", "dataset", "lora_rank", "pure_bf16", "plot_loss",
    },
    Trainer.AXOLOTL: {
        "base_model", "unfrozen_parameters", "adapter", "lora_target_modules", "lora_target_linear",
        "peft_layers_to_transform", "peft_layers_pattern", "lora_modules_to_save", "micro_batch_size",
        "datasets", "sequence_len", "sample_packing", "lora_r", "wandb_project", "base_model_config",
    },
    Trainer.PEFT: {"peft_type", "r", "lora_alpha", "target_modules", "layers_to_transform", "task_type"},
    Trainer.SWIFT: {
        "tuner_type", "train_type", "trainable_parameters", "trainable_parameters_regex", "freeze_parameters",
        "freeze_parameters_regex", "freeze_parameters_ratio", "target_regex", "lora_rank", "model",
    },
}  # fmt: skip
# Keys each trainer reads that do not choose trainable parameters (listed neither as read nor unknown).
INERT = {
    Trainer.LLAMA_FACTORY: {
        "model_name_or_path", "trust_remote_code", "stage", "do_train", "dataset", "dataset_dir", "template",
        "cutoff_len", "max_samples", "overwrite_cache", "preprocessing_num_workers", "dataloader_num_workers",
        "output_dir", "logging_steps", "save_steps", "plot_loss", "overwrite_output_dir", "save_only_model",
        "report_to", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
        "num_train_epochs", "max_steps", "lr_scheduler_type", "warmup_ratio", "warmup_steps", "bf16", "fp16",
        "pure_bf16", "ddp_timeout", "resume_from_checkpoint", "val_size", "per_device_eval_batch_size",
        "eval_strategy", "eval_steps", "deepspeed", "use_cpu", "lora_rank", "lora_alpha", "lora_dropout",
        "use_rslora", "use_dora", "flash_attn", "seed", "weight_decay", "use_reentrant_gc",
        "disable_gradient_checkpointing", "packing", "train_on_prompt", "save_total_limit", "run_name",
        "enable_liger_kernel", "optim", "max_grad_norm", "adam_beta1", "adam_beta2", "eval_dataset",
    },
    Trainer.AXOLOTL: {
        "base_model", "base_model_config", "model_type", "tokenizer_type", "load_in_8bit", "load_in_4bit",
        "strict", "datasets", "dataset_prepared_path", "val_set_size", "output_dir", "sequence_len",
        "sample_packing", "pad_to_sequence_len", "lora_r", "lora_alpha", "lora_dropout", "wandb_project",
        "wandb_entity", "wandb_watch", "wandb_name", "wandb_log_model", "gradient_accumulation_steps",
        "micro_batch_size", "num_epochs", "max_steps", "optimizer", "lr_scheduler", "learning_rate",
        "train_on_inputs", "group_by_length", "bf16", "fp16", "tf32", "gradient_checkpointing",
        "gradient_checkpointing_kwargs", "early_stopping_patience", "resume_from_checkpoint", "logging_steps",
        "xformers_attention", "flash_attention", "sdp_attention", "warmup_steps", "warmup_ratio",
        "evals_per_epoch", "saves_per_epoch", "save_steps", "debug", "deepspeed", "weight_decay", "fsdp",
        "fsdp_config", "special_tokens", "chat_template", "seed",
    },
    Trainer.PEFT: {
        "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
        "r", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora", "use_dora", "lora_bias",
        "init_lora_weights", "rank_pattern", "alpha_pattern", "megatron_config", "megatron_core",
        "loftq_config", "eva_config", "corda_config", "qalora_group_size", "use_qalora", "runtime_config",
        "ensure_weight_tying",
    },
    Trainer.SWIFT: {
        "model", "dataset", "output_dir", "num_train_epochs", "max_steps", "learning_rate",
        "per_device_train_batch_size", "gradient_accumulation_steps", "torch_dtype", "max_length",
        "gradient_checkpointing", "gradient_checkpointing_kwargs", "save_steps", "eval_steps",
        "logging_steps", "warmup_ratio", "deepspeed", "lora_rank", "lora_alpha", "lora_dropout",
        "system", "seed", "packing", "attn_impl", "report_to", "save_total_limit", "use_hf",
        "llamapro_num_new_blocks", "llamapro_num_groups",
    },
}  # fmt: skip
SELECT = {
    Trainer.LLAMA_FACTORY: ct.select_llama_factory,
    Trainer.AXOLOTL: ct.select_axolotl,
    Trainer.PEFT: ct.select_peft,
    Trainer.SWIFT: ct.select_swift,
}


@dataclass(frozen=True)
class CheckReport:
    """`freeze-map --check`: what the trainer config trains, against the freeze map. `--json` prints it."""

    checkpoint: str
    config: str
    trainer: str
    rule: str
    method: str  # full, freeze or lora
    agrees: bool
    new_layers: tuple[int, ...]
    new_layers_trained: tuple[int, ...]  # fully (full/freeze) or with at least one adapter (lora)
    new_layers_left_frozen: tuple[int, ...]
    new_layers_partly: tuple[int, ...]  # some of their parameters (or linear modules) left out
    original_layers_trained: tuple[int, ...]
    other_trained: tuple[str, ...]  # parameters outside the layers the map keeps frozen
    roles_left_frozen: tuple[str, ...]  # parameters outside the layers the map trains (--also) but not this
    unmatched: tuple[str, ...]  # config entries that match no name
    refused: str | None  # the trainer itself would raise on this config
    trainable_parameters: int  # parameters trained whole
    adapted_modules: int  # modules with a LoRA adapter
    interpreted_keys: tuple[str, ...]
    unknown_keys: tuple[str, ...]
    notes: tuple[str, ...]


def check_trainer_config(
    checkpoint: str | Path | Checkpoint | FreezeMap, config: str | Path, *, also: Iterable[str] = ()
) -> CheckReport:
    """Check a trainer config file against the expanded checkpoint's freeze map."""
    doc, origin = read_trainer_file(Path(config))
    trainer = detect_trainer(doc, origin, Path(config))
    fm = checkpoint if isinstance(checkpoint, FreezeMap) else freeze_map(checkpoint, also=also)
    model = model_names(fm)
    selection = SELECT[trainer](doc, model)
    known = INERT[trainer] | set(selection.interpreted)
    unknown = tuple(k for k in doc if k not in known)
    return _compare(fm, model, selection, trainer, str(config), unknown)


def read_trainer_file(path: Path) -> tuple[dict[str, Any], str]:
    """The config as a mapping, and what it was: "json", "yaml" or "swift command"."""
    if not path.is_file():
        raise InputError(
            f"--check {path}: no such file" if not path.exists() else f"--check {path}: not a file"
        )
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_SIZE + 1)
        if len(raw) > MAX_CONFIG_SIZE:
            raise InputError(f"--check {path}: larger than {MAX_CONFIG_SIZE} bytes; not a trainer config")
        text = raw.decode("utf-8")
    except OSError as e:
        raise InputError(f"--check {path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError:
        raise InputError(f"--check {path}: not UTF-8 text") from None
    stripped = text.lstrip()
    if _is_swift_command(stripped):
        return _swift_args(text, path), "swift command"
    try:
        if path.suffix == ".json" or stripped.startswith("{"):
            doc, origin = json.loads(text), "json"
        else:
            import yaml  # pyyaml: safe_load builds plain data only, never objects from tags

            doc, origin = yaml.safe_load(text), "yaml"
    except (ValueError, RecursionError) as e:
        raise InputError(f"--check {path}: not valid JSON ({str(e).splitlines()[0]})") from None
    except Exception as e:  # yaml.YAMLError and its subclasses (imported lazily)
        if type(e).__module__.startswith("yaml"):
            raise InputError(f"--check {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        raise
    if not isinstance(doc, dict) or not all(isinstance(k, str) for k in doc):
        raise InputError(f"--check {path}: not a mapping of option names to values")
    return doc, origin


def _is_swift_command(text: str) -> bool:
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    words = [w for w in code.replace("\\\n", " ").split() if "=" not in w or w.startswith("-")]
    return bool(words) and words[0] == "swift"


def _swift_args(text: str, path: Path) -> dict[str, Any]:
    """`swift sft --key v1 v2 --flag --k=v ...` as ms-swift's argument parser reads it."""
    try:
        words = shlex.split(text.replace("\\\n", " "), comments=True)
    except ValueError as e:
        raise InputError(f"--check {path}: not a readable command line ({e})") from None
    while words and "=" in words[0] and not words[0].startswith("-"):
        words.pop(0)  # VAR=value prefixes
    args: dict[str, Any] = {}
    key: str | None = None
    for word in words[2:]:  # "swift" and the subcommand
        if word.startswith("--"):
            key, _, value = word[2:].partition("=")
            args[key] = value if value else []
            if value:
                key = None
        elif key is not None:
            args[key].append(word)
    return {
        k: (v[0] if isinstance(v, list) and len(v) == 1 else (v if v != [] else True))
        for k, v in args.items()
    }


def detect_trainer(doc: Mapping[str, Any], origin: str, path: Path) -> Trainer:
    if origin == "swift command":
        return Trainer.SWIFT
    if "peft_type" in doc:
        return Trainer.PEFT
    scores = {t: len(SIGNATURES[t] & set(doc)) for t in Trainer if t is not Trainer.PEFT}
    best = max(scores.values())
    winners = [t for t, s in scores.items() if s == best]
    if best == 0 or len(winners) > 1:
        raise InputError(
            f"--check {path}: cannot tell which trainer this config is for"
            + (f" ({', '.join(w.value for w in winners)} alike)" if best else " (no known option names)"),
            hint="llamapro reads LLaMA-Factory and Axolotl YAML/JSON, PEFT adapter_config.json, swift args",
        )
    return winners[0]


def model_names(fm: FreezeMap) -> ct.Model:
    """The trainer's view of the expanded model, from the freeze map's in-memory names."""
    family = next((f for f in FAMILIES if f.name == fm.architecture), None)
    family = family.for_checkpoint(fm.tensors) if family else None
    embeddings = {memory_name(family, k) for k in family.roles.embeddings} if family else set()
    heads = {memory_name(family, k).removesuffix(".weight") for k in family.roles.head} if family else set()
    linear: dict[str, None] = {}
    for entry in fm.tensors.values():
        name = entry.parameter
        if name and name.endswith(".weight") and len(entry.shape) == 2 and name not in embeddings:
            module = name.removesuffix(".weight")
            if "norm" not in module.rsplit(".", 1)[-1]:
                linear.setdefault(module)
    names = (*fm.trainable_parameters, *fm.frozen_parameters)
    order = {n: i for i, n in enumerate(e.parameter for e in fm.tensors.values() if e.parameter)}

    def position(name: str) -> tuple[int, int, int]:  # embeddings, blocks by index, the rest
        layer = _layer(fm, name)
        return (0 if name in embeddings else 1 if layer is not None else 2, layer or 0, order.get(name, 0))

    return ct.Model(
        tuple(sorted(names, key=position)), fm.parameter_numel(), tuple(linear), tuple(heads), fm.num_layers
    )


def _layer(fm: FreezeMap, name: str) -> int | None:
    if not name.startswith(fm.memory_prefix):
        return None
    head = name[len(fm.memory_prefix) :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _compare(
    fm: FreezeMap, model: ct.Model, sel: ct.Selection, trainer: Trainer, config: str, unknown: tuple[str, ...]
) -> CheckReport:
    new = set(fm.new_layers)
    by_layer: dict[int, set[str]] = {}
    for name in model.parameters:
        layer = _layer(fm, name)
        if layer is not None:
            by_layer.setdefault(layer, set()).add(name)
    linear_by_layer: dict[int, set[str]] = {}
    for module in model.linear:
        layer = _layer(fm, module + ".")
        if layer is not None:
            linear_by_layer.setdefault(layer, set()).add(module)
    touched: dict[int, str] = {}  # layer -> "all" / "some"
    for layer, params in by_layer.items():
        whole = params & sel.trainable
        adapted = {m for m in sel.adapted if _layer(fm, m + ".") == layer}
        if sel.method == "lora":
            if adapted or whole:
                full = adapted >= linear_by_layer.get(layer, set()) or whole == params
                touched[layer] = "all" if full else "some"
        elif whole:
            touched[layer] = "all" if whole == params else "some"
    outside_map = {n for n in fm.trainable_parameters if _layer(fm, n) is None}
    outside_sel = {n for n in sel.trainable if _layer(fm, n) is None}
    frozen_new = fm.new_layers if sel.refused else tuple(i for i in fm.new_layers if i not in touched)
    partly = tuple(i for i in fm.new_layers if touched.get(i) == "some")
    originals = tuple(sorted(i for i in touched if i not in new))
    other, roles = tuple(sorted(outside_sel - outside_map)), tuple(sorted(outside_map - outside_sel))
    # A LoRA run on some of a new layer's linear modules is a choice; a partial full/freeze run is not.
    partial_fails = sel.method != "lora" and partly
    agrees = not (frozen_new or originals or other or roles or sel.unmatched or sel.refused or partial_fails)
    return CheckReport(
        checkpoint=fm.checkpoint,
        config=config,
        trainer=trainer.value,
        rule=RULES[trainer],
        method=sel.method,
        agrees=agrees,
        new_layers=fm.new_layers,
        new_layers_trained=tuple(i for i in fm.new_layers if i in touched),
        new_layers_left_frozen=frozen_new,
        new_layers_partly=partly,
        original_layers_trained=originals,
        other_trained=other,
        roles_left_frozen=roles,
        unmatched=sel.unmatched,
        refused=sel.refused,
        trainable_parameters=len(sel.trainable),
        adapted_modules=len(sel.adapted),
        interpreted_keys=tuple(k for k in sel.interpreted if k),
        unknown_keys=unknown,
        notes=sel.notes,
    )
