"""Trainer snippets from a freeze map: one renderer per format, each checked by its trainer's own rule.

Every renderer writes a paste-ready snippet (YAML, Python, shell, a regex or a name list) and then
*applies that trainer's matching rule* (`rules.py`, ported from its source) to the map's in-memory
parameter names, through `snippet.checked()`: the snippet is only returned when the rule selects exactly
the map's trainable set; a format that cannot express the set raises `UsageError` (exit 2) with a hint
naming one that can. The resolved counts go into a comment in the snippet; pitfalls go into comments or,
for `names` and `regex` (whose stdout is data), into `notes` for stderr.

Invariant: the snippet text and the self-check use the same values (patterns, ids, prefixes). Must not:
print, import torch or the trainers themselves.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from typing import Any

from llamapro_cli.errors import InputError, UsageError
from llamapro_cli.freeze import rules
from llamapro_cli.freeze.manifest import check_consistent
from llamapro_cli.freeze.map import FreezeMap
from llamapro_cli.freeze.snippet import (
    Format,
    Lang,
    Snippet,
    all_parameters,
    checked,
    counts,
    few,
    header,
    layer_ids,
    literal,
    one_line,
    parse_format,
    pitfalls,
    refuse,
    role_parameters,
)

__all__ = ["Format", "Snippet", "parse_format", "render", "usable_formats"]
LORA_RANK = 16  # written into the peft snippet; the adapter counts in its comment assume it


def usable_formats(fm: FreezeMap) -> tuple[Format, ...]:
    """The trainer formats that can express this map (each renders and passes its trainer's rule); none
    for a map whose fields disagree (the renderers assume a map as `freeze_map()` builds it)."""
    try:
        check_consistent(fm)
    except InputError:
        return ()
    usable = []
    for fmt in (Format.AXOLOTL, Format.HF, Format.SWIFT, Format.PEFT, Format.LLAMA_FACTORY):
        try:
            render(fm, fmt)
        except (UsageError, InputError):
            continue
        usable.append(fmt)
    return tuple(usable)


def render(fm: FreezeMap, fmt: Format | str) -> Snippet:
    """The snippet for one trainer format (not `text`/`json`, which `output` renders from the map)."""
    fmt = parse_format(fmt) if isinstance(fmt, str) else fmt
    renderers: dict[Format, Callable[[FreezeMap], Snippet]] = {
        Format.NAMES: _names,
        Format.REGEX: _regex,
        Format.AXOLOTL: _axolotl,
        Format.LLAMA_FACTORY: _llama_factory,
        Format.PEFT: _peft,
        Format.SWIFT: _swift,
        Format.HF: _hf,
    }
    if fmt not in renderers:
        raise UsageError(f"--format {fmt.value} is not a trainer snippet")
    return renderers[fmt](fm)


def _select(fm: FreezeMap, fmt: Format, rule: Callable[..., set[str]], *args: Any) -> list[str]:
    """What the trainer's `rule` selects, in the map's parameter order (so snippets are deterministic);
    settings the trainer itself would refuse are refused here (exit 2)."""
    try:
        chosen = rule(*args)
    except rules.RuleError as e:
        raise UsageError(
            f"--format {fmt.value} cannot express this trainable set: the trainer would refuse it ({e})",
            hint="use --format names or json",
        ) from None
    return [n for n in all_parameters(fm) if n in chosen]


# --- names and regex: stdout is data, everything else goes to stderr -------------------------------------


def _names(fm: FreezeMap) -> Snippet:
    names = [_one_line_name(n) for n in fm.trainable_parameters]
    notes = [counts(fm, "exact parameter names"), *fm.notes]
    return checked(fm, Format.NAMES, names, "\n".join(names) + "\n", notes)


def _one_line_name(text: str) -> str:
    """A name or pattern printed as one line of data: refused when a character would split or hide it."""
    if not text.isprintable():
        raise InputError(
            f"a tensor name holds a line break or control character ({one_line(text)[:80]}): "
            "a list of one name per line cannot carry it",
            hint="use --format json, which escapes it",
        )
    return text


def layer_regex(fm: FreezeMap) -> str:
    """One anchored Python regex over in-memory names; the same under re.match, search and fullmatch."""
    parts = [rf"{re.escape(fm.memory_prefix)}(?:{'|'.join(map(str, fm.new_layers))})\..+"]
    parts += [re.escape(n) for n in role_parameters(fm)]
    return "^(?:" + "|".join(parts) + ")$"


def _regex(fm: FreezeMap) -> Snippet:
    pattern = _one_line_name(layer_regex(fm))
    selected = _select(fm, Format.REGEX, rules.anchored_regex, pattern, all_parameters(fm))
    notes = [counts(fm, "re.match"), *fm.notes]
    return checked(fm, Format.REGEX, selected, pattern + "\n", notes)


# --- Axolotl: unfrozen_parameters (src/axolotl/utils/freeze.py, LayerNamePattern) -------------------------


def axolotl_patterns(fm: FreezeMap) -> list[str]:
    # Plain dots: Axolotl escapes every "." not followed by "+" itself (a "\." would become "\\.").
    # The trailing dot keeps layer 4 from matching 40-49 under its start-anchored re.match.
    layers = [f"{fm.memory_prefix}{i}." for i in fm.new_layers]
    return layers + [f"{n}$" for n in role_parameters(fm)]


def _axolotl(fm: FreezeMap) -> Snippet:
    patterns = axolotl_patterns(fm)
    selected = _select(fm, Format.AXOLOTL, rules.axolotl, patterns, all_parameters(fm))
    lines = header(fm, counts(fm, "Axolotl's rule (dots escaped, re.match)"))
    lines += [
        "# Full fine-tuning only (no `adapter:`): for LoRA on the new layers use",
        f"#   adapter: lora / lora_target_linear: true / peft_layers_to_transform: [{layer_ids(fm)}]",
        "#   peft_layers_pattern: [layers]   (Axolotl refuses it together with unfrozen_parameters)",
        *pitfalls(
            fm, checkpointing="keep use_reentrant false (Axolotl refuses true with unfrozen_parameters)"
        ),
        "unfrozen_parameters:",
        *(f"  - {literal(Lang.YAML, p)}" for p in patterns),
        "gradient_checkpointing_kwargs:",
        "  use_reentrant: false",
    ]
    return checked(fm, Format.AXOLOTL, selected, "\n".join(lines) + "\n", fm.notes)


# --- LLaMA-Factory: freeze tuning with use_llama_pro (model/adapter.py::_setup_freeze_tuning) -------------


def _llama_factory(fm: FreezeMap) -> Snippet:
    k = len(fm.new_layers)
    ids = rules.llama_factory_ids(fm.num_layers, k)
    if ids != list(fm.new_layers):
        would = f"it would train layers {few([str(i) for i in ids])}" if ids else f"{k} does not divide it"
        raise UsageError(
            f"--format llama-factory cannot express new layers {layer_ids(fm)} of {fm.num_layers}: "
            f"use_llama_pro trains layers k*s-1 with stride s = {fm.num_layers}/{k}, and {would}",
            hint="use --format axolotl, swift or hf for full fine-tuning of exactly these layers, "
            "or --format peft for LoRA",
        )
    # freeze_extra_modules takes the module name one level above the parameter (name.split(".")[-2]),
    # and LLaMA-Factory only accepts those of parameters outside numbered layers.
    extra = list(dict.fromkeys(n.split(".")[-2] for n in role_parameters(fm)))
    outside = {n.split(".")[-2] for n in all_parameters(fm) if not re.search(r"\.\d+\.", n)}
    if not set(extra) <= outside:
        refuse(Format.LLAMA_FACTORY, [], sorted(set(extra) - outside))
    config = {
        "freeze_trainable_layers": k,
        "freeze_trainable_modules": "all",
        "use_llama_pro": True,
        "freeze_extra_modules": ",".join(extra) or None,
    }
    selected = _select(
        fm, Format.LLAMA_FACTORY, rules.llama_factory, config, all_parameters(fm), fm.num_layers
    )
    lines = header(fm, counts(fm, "LLaMA-Factory's rule (stride ids, substring match)"))
    lines += [
        f"# use_llama_pro re-derives the layers from num_hidden_layers (stride {fm.num_layers}/{k}),",
        "# which gives exactly the new layers here. Trainable params are upcast to fp32 unless",
        "# pure_bf16: saved new layers may be fp32 (llamapro verify-frozen converts them back).",
        *_cpu_note(fm),
        *pitfalls(fm, checkpointing="use_reentrant_gc: false (LLaMA-Factory's default is true)"),
        "finetuning_type: freeze",
        f"freeze_trainable_layers: {k}  # the number of NEW layers, not 'the last {k} layers'",
        "freeze_trainable_modules: all",
        "use_llama_pro: true",
        "use_reentrant_gc: false",
    ]
    if extra:
        lines.append(f"freeze_extra_modules: {literal(Lang.YAML, ','.join(extra))}")
    return checked(fm, Format.LLAMA_FACTORY, selected, "\n".join(lines) + "\n", fm.notes)


def _cpu_note(fm: FreezeMap) -> list[str]:
    """Measured with LLaMA-Factory 0.9.5: with bf16: false a bf16 checkpoint fails on CPU at step 0
    ("expected m1 and m2 to have the same dtype")."""
    if not any(e.dtype == "BF16" for e in fm.tensors.values()):
        return []
    return ["# On CPU (use_cpu: true) LLaMA-Factory 0.9.5 needs bf16: true for this bf16 checkpoint."]


# --- PEFT LoRA: layers_to_transform (tuners/tuners_utils.py::check_target_module_exists) ------------------


def module_names(parameters: Sequence[str]) -> list[str]:
    """Every module that owns or contains a parameter (what `named_modules()` yields, root excluded)."""
    seen: dict[str, None] = {}
    for name in parameters:
        parts = name.split(".")[:-1]
        for end in range(1, len(parts) + 1):
            seen.setdefault(".".join(parts[:end]))
    return list(seen)


def lora_targets(fm: FreezeMap) -> list[str]:
    """Modules of the new layers that get an adapter: those owning a 2-D weight (the linear layers),
    except per-head norms (Cohere's q/k LayerNorm weights are 2-D too)."""
    prefixes = tuple(f"{fm.memory_prefix}{i}." for i in fm.new_layers)
    out = []
    for e in fm.tensors.values():
        name = e.parameter
        if name and name.startswith(prefixes) and name.endswith(".weight") and len(e.shape) == 2:
            module = name[: -len(".weight")]
            if "norm" not in module.rsplit(".", 1)[-1]:
                out.append(module)
    return out


def has_fused_experts(fm: FreezeMap) -> bool:
    """Whether the model holds MoE experts as fused parameters: several checkpoint keys loading into one
    parameter, or a 3-D `experts` tensor (fused on disk already); convolutions are 3-D too, so the name
    matters."""
    keys: dict[str, int] = {}
    for entry in fm.tensors.values():
        if entry.parameter is not None:
            keys[entry.parameter] = keys.get(entry.parameter, 0) + 1
            if len(entry.shape) > 2 and ".experts." in entry.parameter:
                return True
    return any(n > 1 for n in keys.values())


def peft_arguments(fm: FreezeMap) -> dict[str, Any]:
    """LoraConfig keyword arguments putting adapters on exactly the new layers' linear modules."""
    if has_fused_experts(fm):
        # PEFT under transformers 5 rewrites target names it knows from per-expert checkpoints
        # (gate_proj, w1, gate, ...) into `target_parameters` on the fused experts of *every* layer,
        # ignoring layers_to_transform (peft/utils/transformers_weight_conversion.py): no list of
        # leaf names is safe, so refuse rather than print a snippet that trains original layers.
        raise UsageError(
            "--format peft cannot limit LoRA to the new layers of a model with fused MoE experts: PEFT "
            "turns expert target names into target_parameters on every layer, ignoring layers_to_transform",
            hint="use --format hf, axolotl or swift (full training of the new layers)",
        )
    if any(n.endswith(".A_log") for n in all_parameters(fm)):
        # PEFT refuses LoRA on out_proj/conv1d of Mamba-style models
        # (peft/tuners/tuners_utils.py::_check_lora_target_modules_mamba).
        raise UsageError(
            "--format peft does not support models with Mamba-style state-space mixers",
            hint="use --format hf, axolotl or swift (full training of the new layers)",
        )
    targets = lora_targets(fm)
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    saved = sorted({n.rsplit(".", 1)[0] for n in role_parameters(fm)})
    modules = module_names(all_parameters(fm))
    # layers_pattern is a regex fragment: the last prefix segment, else the whole (escaped) prefix.
    for pattern in (fm.memory_prefix.rstrip(".").rsplit(".", 1)[-1], re.escape(fm.memory_prefix.rstrip("."))):
        args: dict[str, Any] = {
            "target_modules": leaves,
            "layers_to_transform": list(fm.new_layers),
            "layers_pattern": pattern,
        }
        if saved:
            args["modules_to_save"] = saved  # full module names: PEFT matches them with endswith
        with contextlib.suppress(rules.RuleError):  # PEFT could not compile this layers_pattern
            if rules.peft_lora_targets(args, modules) == set(targets):
                return args
    raise UsageError(
        "--format peft cannot put adapters on exactly the new layers' linear modules of this model",
        hint="use --format hf or axolotl (full fine-tuning of the new layers)",
    )


def _peft(fm: FreezeMap) -> Snippet:
    args = peft_arguments(fm)
    targets = lora_targets(fm)
    shapes = {e.parameter: e.shape for e in fm.tensors.values() if e.parameter}
    adapter = sum(LORA_RANK * sum(shapes[f"{t}.weight"]) for t in targets)
    saved = role_parameters(fm)
    numel = fm.parameter_numel()
    lines = header(
        fm,
        f"checked with PEFT's rule (target suffix + layers_pattern index): adapters on {len(targets)} "
        f"linear modules; with r={LORA_RANK}: {2 * len(targets) + len(saved)} trainable tensors, "
        f"{adapter + sum(numel[n] for n in saved):,} trainable parameters",
    )
    lines += [
        "# layers_to_transform only reaches modules inside numbered layers; modules_to_save (with --also)",
        "# trains a deep copy of each listed module (extra memory).",
        *pitfalls(
            fm, checkpointing='call model.enable_input_require_grads() or use {"use_reentrant": False}'
        ),
        "from peft import LoraConfig, get_peft_model",
        "",
        "lora_config = LoraConfig(",
        f"    r={LORA_RANK},",
        f"    lora_alpha={2 * LORA_RANK},",
        *(f"    {key}={literal(Lang.PYTHON, value)}," for key, value in args.items()),
        '    task_type="CAUSAL_LM",',
        ")",
        "model = get_peft_model(model, lora_config)",
    ]
    return Snippet(
        Format.PEFT, "\n".join(lines) + "\n", tuple(targets), 2 * len(targets) + len(saved), adapter, fm.notes
    )


# --- ms-swift: full tuning with trainable prefixes (swift/utils/transformers_utils.py) --------------------


def swift_prefixes(fm: FreezeMap) -> list[str]:
    # startswith matching: the trailing dot keeps layer 4 from matching 40-49.
    return [f"{fm.memory_prefix}{i}." for i in fm.new_layers] + role_parameters(fm)


def _swift(fm: FreezeMap) -> Snippet:
    prefixes = swift_prefixes(fm)
    # freeze_parameters_ratio 1 freezes everything; activate_parameters then turns prefixes back on.
    args = {"tuner_type": "full", "freeze_parameters_ratio": 1, "trainable_parameters": prefixes}
    numel = fm.parameter_numel()
    selected = _select(fm, Format.SWIFT, rules.swift, args, [(n, numel[n]) for n in all_parameters(fm)])
    lines = header(fm, counts(fm, "ms-swift's rule (freeze all, then startswith)"))
    lines += [
        "# --trainable_parameters applies only with --tuner_type full (--train_type before ms-swift v4).",
        "# Do not use --tuner_type llamapro on this checkpoint: it would expand it again at load time.",
        *pitfalls(fm, checkpointing="add --gradient_checkpointing_kwargs '{\"use_reentrant\": false}'"),
        f"swift pt --model {literal(Lang.SHELL, fm.checkpoint)} \\",
        "  --tuner_type full --freeze_parameters_ratio 1 \\",
        f"  --trainable_parameters {literal(Lang.SHELL, prefixes)}",
    ]
    return checked(fm, Format.SWIFT, selected, "\n".join(lines) + "\n", fm.notes)


# --- Hugging Face Trainer / plain PyTorch: requires_grad on `model` --------------------------------------


def _hf(fm: FreezeMap) -> Snippet:
    pattern = layer_regex(fm)
    selected = _select(fm, Format.HF, rules.requires_grad, pattern, all_parameters(fm))
    n = len(fm.trainable_parameters)
    lines = header(fm, counts(fm, "re.match on named_parameters()"))
    lines += [
        "# Freeze after resize_token_embeddings (it makes the embeddings trainable again) and before",
        "# Trainer / accelerate / DeepSpeed see the model.",
        *pitfalls(
            fm, checkpointing='TrainingArguments(gradient_checkpointing_kwargs={"use_reentrant": False})'
        ),
        "import re",
        "",
        f"TRAINABLE = re.compile({literal(Lang.PYTHON, pattern, regex=True)})",
        "for name, param in model.named_parameters():",
        "    param.requires_grad_(TRAINABLE.match(name) is not None)",
        "n_trainable = sum(p.requires_grad for p in model.parameters())",
        f'assert n_trainable == {n}, f"expected {n} trainable tensors, got {{n_trainable}} (wrapped model?)"',
    ]
    return checked(fm, Format.HF, selected, "\n".join(lines) + "\n", fm.notes)
