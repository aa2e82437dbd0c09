"""What a user's trainer config trains, under that trainer's own rule: one function per trainer.

Each `select_*` takes the parsed config (a mapping, as the trainer reads it) and the model's in-memory
parameter names, and returns a `Selection`: the parameters a full or freeze run leaves trainable, or the
modules a LoRA run puts adapters on (plus what `modules_to_save` trains whole), the config entries that
match no name, and the trainer's own refusal when it would raise. The matching itself is `rules.py`
(each port cites its trainer's source and version); the LoRA target lists that trainers resolve from a
model (`all`, `all-linear`, LLaMA-Factory's `find_expanded_modules`) are ported here.

"Linear module" is read from the names as the snippets read it: a module owning a 2-D `weight` that is
no norm, outside the embeddings; output layers (`lm_head`) are excluded as PEFT's and LLaMA-Factory's
"all linear" exclude them.

Invariant: a selection is the trainer's behaviour, quirks included; a key that changes what trains and
is not ported here is `Uninterpretable` (the check then cannot vouch, exit 3), never guessed.
Must not: import the trainers, torch or yaml; print.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llamapro_cli.errors import InputError
from llamapro_cli.freeze import rules


@dataclass(frozen=True)
class Model:
    """The names a trainer sees: parameters in model order, their element counts, the linear modules."""

    parameters: tuple[str, ...]
    numel: Mapping[str, int]
    linear: tuple[str, ...]  # module names
    output_layers: tuple[str, ...]  # module names of the head (excluded from "all linear")
    num_layers: int

    @property
    def modules(self) -> list[str]:
        seen: dict[str, None] = {}
        for name in self.parameters:
            parts = name.split(".")[:-1]
            for end in range(1, len(parts) + 1):
                seen.setdefault(".".join(parts[:end]))
        return list(seen)

    def linear_leaves(self) -> list[str]:
        """`find_all_linear_modules` / PEFT's `all-linear`: leaf names of linear modules, head excluded."""
        heads = set(self.output_layers)
        return sorted({m.rsplit(".", 1)[-1] for m in self.linear if m not in heads and "lm_head" not in m})

    def under(self, modules: Sequence[str]) -> set[str]:
        """Parameters inside any of `modules`."""
        prefixes = tuple(f"{m}." for m in modules)
        return {p for p in self.parameters if p.startswith(prefixes)}


@dataclass(frozen=True)
class Selection:
    method: str  # "full", "freeze" or "lora"
    trainable: frozenset[str] = frozenset()  # parameter names trained whole
    adapted: frozenset[str] = frozenset()  # module names with a LoRA adapter
    unmatched: tuple[str, ...] = ()  # "key: entry" that selects no name
    refused: str | None = None  # the trainer itself raises on this config: why
    interpreted: tuple[str, ...] = ()  # the config keys this selection read
    notes: tuple[str, ...] = field(default=())


class Uninterpretable(InputError):
    """The config asks for something that decides what trains and llamapro does not port it (exit 3)."""


def _csv(value: Any, key: str) -> list[str]:
    """LLaMA-Factory's comma-separated arguments (`split_arg`); a YAML list is taken as its items."""
    if value is None:
        return []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value]
    if not isinstance(value, str):
        raise InputError(f"{key}: expected a comma-separated string, got {value!r}")
    return [v.strip() for v in value.split(",") if v.strip()]


def _strings(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise InputError(f"{key}: expected a string or a list of strings, got {value!r}")


def _ints(value: Any, key: str) -> list[int] | int | None:
    if value is None or (type(value) is int):
        return value
    if isinstance(value, list) and all(type(v) is int for v in value):
        return list(value)
    raise InputError(f"{key}: expected a layer index or a list of them, got {value!r}")


def _refuse_unported(config: Mapping[str, Any], keys: Mapping[str, str], trainer: str) -> None:
    for key, what in keys.items():
        value = config.get(key)
        if value not in (None, False, "", [], {}, "none", "None"):
            raise Uninterpretable(
                f"{key}: {value!r} changes what {trainer} trains ({what}); llamapro does not port that rule",
                hint="remove it to check the rest, or check this run with llamapro verify-frozen afterwards",
            )


def _unmatched(label: str, entries: Sequence[str], hits: Mapping[str, set[str]]) -> list[str]:
    return [f"{label}: {e}" for e in entries if not hits.get(e)]


def _lora(
    model: Model, targets: list[str] | str, config: Mapping[str, Any], label: str, interpreted: Sequence[str]
) -> Selection:
    """PEFT's matching (`rules.peft_lora_targets`) of resolved targets, linear modules only."""
    peft_config = {**config, "target_modules": targets}
    modules = model.modules
    try:
        matched = rules.peft_lora_targets(peft_config, modules)
    except re.error as e:
        return Selection(
            "lora", refused=f"{label}: {targets!r} is not a valid regex ({e})", interpreted=tuple(interpreted)
        )
    linear = set(model.linear)
    refused = None
    if matched - linear:
        odd = sorted(matched - linear)
        refused = f"PEFT raises: {odd[0]} is not a linear layer (target module type not supported)"
    unmatched: list[str] = []
    if isinstance(targets, list):
        hits = {t: {m for m in matched if m == t or m.endswith(f".{t}")} for t in targets}
        unmatched = _unmatched(label, targets, hits)
    elif not matched:
        unmatched = [f"{label}: {targets}"]
    saved = _strings(config.get("modules_to_save"), "modules_to_save")
    # _set_trainable wraps every module whose name ends with an entry: no dot boundary (PEFT's quirk).
    saved_modules = {m for m in modules if any(m.endswith(s) for s in saved)}
    unmatched += [f"modules_to_save: {s}" for s in saved if not any(m.endswith(s) for m in saved_modules)]
    trainable = frozenset(model.under(sorted(saved_modules)))
    return Selection(
        "lora", trainable, frozenset(matched & linear), tuple(unmatched), refused, tuple(interpreted)
    )


# --- LLaMA-Factory 0.9.5 (src/llamafactory/hparams/finetuning_args.py, model/adapter.py) -----------------

LLAMA_FACTORY_UNPORTED = {
    "use_badam": "BAdam trains one block at a time",
    "use_galore": "GaLore projects the gradients of its targets",
    "use_apollo": "APOLLO projects the gradients of its targets",
    "pissa_init": "PiSSA rewrites the base weights",
    "freeze_language_model": "a multimodal freeze switch",
    "train_mm_proj_only": "a multimodal freeze switch",
}


def select_llama_factory(config: Mapping[str, Any], model: Model) -> Selection:
    """`init_adapter`: `finetuning_type` (default lora) picks `_setup_full/freeze/lora_tuning`."""
    _refuse_unported(config, LLAMA_FACTORY_UNPORTED, "LLaMA-Factory")
    kind = str(config.get("finetuning_type", "lora"))
    pro = bool(config.get("use_llama_pro"))
    k = config.get("freeze_trainable_layers", 2)
    if type(k) is not int:
        raise InputError(f"freeze_trainable_layers: expected an integer, got {k!r}")
    keys = ["finetuning_type", "use_llama_pro", "freeze_trainable_layers"]
    if kind == "full":
        if pro:  # FinetuningArguments.__post_init__
            return Selection("full", refused="`use_llama_pro` is only valid for Freeze or LoRA training.")
        return Selection("full", frozenset(model.parameters), interpreted=("finetuning_type",))
    if kind == "freeze":
        rule = {
            "freeze_trainable_layers": k,
            "freeze_trainable_modules": ",".join(_csv(config.get("freeze_trainable_modules", "all"), "m")),
            "freeze_extra_modules": ",".join(_csv(config.get("freeze_extra_modules"), "e")) or None,
            "use_llama_pro": pro,
        }
        keys += ["freeze_trainable_modules", "freeze_extra_modules"]
        try:
            chosen = rules.llama_factory(rule, model.parameters, model.num_layers)
        except (rules.RuleError, ZeroDivisionError) as e:
            return Selection("freeze", refused=str(e) or "ZeroDivisionError", interpreted=tuple(keys))
        return Selection("freeze", frozenset(chosen), interpreted=tuple(keys))
    if kind != "lora":
        raise Uninterpretable(f"finetuning_type: {kind!r}; llamapro ports freeze, full and lora")
    targets = _csv(config.get("lora_target", "all"), "lora_target")
    if targets == ["all"]:  # find_all_linear_modules: leaf names, lm_head excluded
        targets = model.linear_leaves()
    keys += ["lora_target", "additional_target"]
    if pro:  # find_expanded_modules: full names containing a target and ".{id}."
        ids = rules.llama_factory_ids(model.num_layers, k)
        if ids is None:
            reason = f"`num_layers` {model.num_layers} should be divisible by `num_layer_trainable` {k}."
            return Selection("lora", refused=reason, interpreted=tuple(keys))
        layers = [f".{i}." for i in ids]
        targets = [m for m in model.modules if any(t in m for t in targets) and any(x in m for x in layers)]
    peft = {"modules_to_save": _csv(config.get("additional_target"), "additional_target") or None}
    return _lora(model, targets, peft, "lora_target", keys)


# --- Axolotl (src/axolotl/utils/freeze.py, utils/models.py::load_lora, utils/schemas) ---------------------

AXOLOTL_UNPORTED = {"lora_target_parameters": "LoRA on bare parameters", "relora": "ReLoRA restarts"}


def select_axolotl(config: Mapping[str, Any], model: Model) -> Selection:
    _refuse_unported(config, AXOLOTL_UNPORTED, "Axolotl")
    adapter = config.get("adapter")
    patterns = _strings(config.get("unfrozen_parameters"), "unfrozen_parameters")
    if adapter in ("lora", "qlora"):
        if patterns and config.get("peft_layers_to_transform") is not None:
            return Selection(
                "lora", refused="unfrozen_parameters cannot be combined with peft_layers_to_transform"
            )
        targets = _strings(config.get("lora_target_modules"), "lora_target_modules")
        if config.get("lora_target_linear"):  # load_lora: find_all_linear_names added to the list
            targets = sorted(set(targets) | set(model.linear_leaves()))
        peft = {
            "layers_to_transform": _ints(config.get("peft_layers_to_transform"), "peft_layers_to_transform"),
            "layers_pattern": config.get("peft_layers_pattern"),
            "modules_to_save": config.get("lora_modules_to_save"),
        }
        keys = ["adapter", "lora_target_modules", "lora_target_linear", "peft_layers_to_transform",
                "peft_layers_pattern", "lora_modules_to_save"]  # fmt: skip
        return _lora(model, targets, peft, "lora_target_modules", keys)
    if adapter:
        raise Uninterpretable(f"adapter: {adapter!r}; llamapro ports lora, qlora and full fine-tuning")
    if not patterns:  # a full fine-tune trains everything
        return Selection("full", frozenset(model.parameters), interpreted=("adapter", "unfrozen_parameters"))
    chosen = rules.axolotl(patterns, model.parameters)
    hits = {p: rules.axolotl([p], model.parameters) for p in patterns}
    return Selection(
        "full",
        frozenset(chosen),
        unmatched=tuple(_unmatched("unfrozen_parameters", patterns, hits)),
        interpreted=("adapter", "unfrozen_parameters"),
    )


# --- PEFT 0.21 adapter_config.json (tuners/tuners_utils.py::check_target_module_exists) ------------------

PEFT_UNPORTED = {
    "target_parameters": "LoRA on bare parameters",
    "trainable_token_indices": "trainable token rows",
    "layer_replication": "it grows the model before the adapters attach",
}


def select_peft(config: Mapping[str, Any], model: Model) -> Selection:
    _refuse_unported(config, PEFT_UNPORTED, "PEFT")
    if config.get("peft_type", "LORA") != "LORA":
        raise Uninterpretable(f"peft_type: {config.get('peft_type')!r}; llamapro ports LoRA")
    targets: list[str] | str = config.get("target_modules") or []
    if targets == "all-linear":  # _maybe_include_all_linear_layers
        targets = model.linear_leaves()
    elif not isinstance(targets, str):
        targets = _strings(targets, "target_modules")
    if isinstance(targets, str) and config.get("layers_to_transform") is not None:
        return Selection(
            "lora", refused="`layers_to_transform` cannot be used when `target_modules` is a str."
        )
    peft = {
        k: config.get(k)
        for k in ("layers_to_transform", "layers_pattern", "exclude_modules", "modules_to_save")
    }
    peft["layers_to_transform"] = _ints(peft["layers_to_transform"], "layers_to_transform")
    keys = ["peft_type", "target_modules", *peft]
    return _lora(model, targets, peft, "target_modules", keys)


# --- ms-swift v4 (swift/utils/transformers_utils.py, swift/pipelines/train/tuner.py) ---------------------

SWIFT_UNPORTED = {"freeze_llm": "a multimodal switch", "freeze_vit": "a multimodal switch"}


def select_swift(config: Mapping[str, Any], model: Model) -> Selection:
    tuner = str(config.get("tuner_type", config.get("train_type", "lora")))
    keys = ["tuner_type", "train_type"]
    if tuner == "llamapro":
        return Selection(
            "full",
            refused="tuner_type llamapro expands the model again at load time (on top of llamapro's)",
            interpreted=tuple(keys),
        )
    if tuner == "full":
        ratio = float(config.get("freeze_parameters_ratio", 0) or 0)
        if 0 < ratio < 1:
            raise Uninterpretable(
                f"freeze_parameters_ratio {ratio}: the cut depends on model.parameters() order, which the "
                "checkpoint's names do not give",
                hint="use 0 or 1 with trainable_parameters, as freeze-map --format swift writes",
            )
        trainable = _strings(config.get("trainable_parameters"), "trainable_parameters")
        frozen = _strings(config.get("freeze_parameters"), "freeze_parameters")
        args = {
            "tuner_type": "full",
            "freeze_parameters_ratio": ratio,
            "freeze_parameters": frozen,
            "freeze_parameters_regex": config.get("freeze_parameters_regex"),
            "trainable_parameters": trainable,
            "trainable_parameters_regex": config.get("trainable_parameters_regex"),
        }
        keys += [k for k in args if k != "tuner_type"]
        try:
            chosen = rules.swift(args, [(n, model.numel.get(n, 0)) for n in model.parameters])
        except re.error as e:  # ms-swift only logs a warning and skips the step: that is a difference too
            return Selection("full", refused=f"a *_regex is not a valid regex ({e})", interpreted=tuple(keys))
        hits = {p: {n for n in model.parameters if n.startswith(p)} for p in trainable + frozen}
        unmatched = _unmatched("trainable_parameters", trainable, hits)
        unmatched += _unmatched("freeze_parameters", frozen, hits)
        return Selection("full", frozenset(chosen), unmatched=tuple(unmatched), interpreted=tuple(keys))
    if tuner != "lora":
        raise Uninterpretable(f"tuner_type {tuner!r}; llamapro ports full, lora and llamapro")
    _refuse_unported(config, SWIFT_UNPORTED, "ms-swift")
    regex = config.get("target_regex")
    targets: list[str] | str = (
        regex
        if isinstance(regex, str)
        else _strings(config.get("target_modules", ["all-linear"]), "target_modules")
    )
    if isinstance(targets, list) and "all-linear" in targets:
        targets = sorted((set(targets) - {"all-linear"}) | set(model.linear_leaves()))
    keys += ["target_modules", "target_regex", "modules_to_save"]
    return _lora(model, targets, {"modules_to_save": config.get("modules_to_save")}, "target_modules", keys)
