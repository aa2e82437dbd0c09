"""Each trainer's own rule for choosing trainable parameters, ported from its source.

One function per trainer: it takes the trainer's settings as that trainer reads them (the values a snippet
writes, or a user's own config) and the model's in-memory names, and returns what the trainer would leave
trainable (or, for PEFT, which modules get an adapter). The renderers (`trainers.py`) run these on every
snippet before printing it; a later `freeze-map --check` runs them on a user's trainer config. Each port
cites the file and version it follows (facts: ../shared/reference/trainers.md §2); when a trainer changes
its rule, change the port and its citation together.

Invariant: a port reproduces the trainer's behaviour, quirks included (Axolotl's dot escaping,
LLaMA-Factory's substring test, ms-swift's prefix test), never a cleaner reading of what it should do;
where the trainer raises, the port raises `RuleError` with the trainer's reason.
Must not: import the trainers themselves or torch; know anything about llamapro's freeze map.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class RuleError(ValueError):
    """The trainer itself would refuse these settings (it raises): the message says why."""


def _trainer_raises(rule: Callable[P, R]) -> Callable[P, R]:
    """A pattern the trainer cannot compile makes it raise `re.error`: the port says so as a RuleError."""

    @functools.wraps(rule)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return rule(*args, **kwargs)
        except re.error as e:
            raise RuleError(f"not a valid regular expression ({e})") from None

    return wrapper


@_trainer_raises
def axolotl(unfrozen_parameters: Sequence[str], names: Sequence[str]) -> set[str]:
    """Axolotl `src/axolotl/utils/freeze.py` (`freeze_layers_except`, `LayerNamePattern`), main branch of
    2025-2026 (after axolotl-ai-cloud/axolotl#3586).

    Each pattern loses an optional `[start:end]` range suffix, then every "." not followed by "+" is
    escaped (`re.sub(r"\\.(?!\\+)", "\\\\.", p)`), and a name stays trainable when `regex.match(name)`
    (anchored at the start only) succeeds for any pattern.
    """
    compiled = []
    for pattern in unfrozen_parameters:
        m = re.match(r"^(.+)\[([0-9]*)(?::([0-9]*))?\]$", pattern)
        base = m.group(1) if m else pattern
        compiled.append(re.compile(re.sub(r"\.(?!\+)", "\\.", base)))
    return {n for n in names if any(rx.match(n) for rx in compiled)}


def llama_factory_ids(num_layers: int, k: int) -> list[int] | None:
    """The layers `use_llama_pro` trains for `freeze_trainable_layers: k` (None: LLaMA-Factory raises)."""
    if k <= 0 or num_layers < k or num_layers % k:
        return None
    stride = num_layers // k
    return list(range(stride - 1, num_layers + stride - 1, stride))


@_trainer_raises
def llama_factory(config: Mapping[str, Any], names: Sequence[str], num_layers: int) -> set[str]:
    """LLaMA-Factory 0.9.5 `src/llamafactory/model/adapter.py::_setup_freeze_tuning` (freeze tuning).

    `use_llama_pro`: ValueError unless L % K == 0; stride = L // K; ids = range(stride-1, L+stride-1,
    stride). Otherwise K > 0 is the last K layers, K <= 0 the first |K|. Module names are validated
    (`freeze_trainable_modules` against the names after ".0."/".1.", `freeze_extra_modules` against
    `name.split(".")[-2]` of names without a ".<digits>." part), then a parameter is trainable when any of
    ".{id}.{module}" (module "" for "all") or an extra module name is a *substring* of its name.
    """
    k = int(config["freeze_trainable_layers"])
    if config.get("use_llama_pro"):
        ids = llama_factory_ids(num_layers, k)
        if ids is None:
            raise RuleError(f"`num_layers` {num_layers} should be divisible by `num_layer_trainable` {k}.")
    elif k > 0:
        ids = list(range(max(0, num_layers - k), num_layers))
    else:
        ids = list(range(min(-k, num_layers)))
    hidden, non_hidden = set(), set()
    for name in names:
        if ".0." in name:
            hidden.add(name.split(".0.")[-1].split(".")[0])
        elif ".1." in name:
            hidden.add(name.split(".1.")[-1].split(".")[0])
        if re.search(r"\.\d+\.", name) is None:
            non_hidden.add(name.split(".")[-2])
    modules = [m.strip() for m in str(config.get("freeze_trainable_modules", "all")).split(",")]
    needles = []
    for module in modules:
        if module != "all" and module not in hidden:
            raise RuleError(f"Module {module} is not found")
        needles += [".{:d}.{}".format(i, module if module != "all" else "") for i in ids]
    extras = config.get("freeze_extra_modules")
    for module in [m.strip() for m in str(extras).split(",")] if extras else []:
        if module not in non_hidden:
            choices = ", ".join(sorted(non_hidden))
            raise RuleError(f"Module {module} is not found, please choose from {choices}")
        needles.append(module)
    return {n for n in names if any(t in n for t in needles)}


@_trainer_raises
def swift(args: Mapping[str, Any], named_numels: Sequence[tuple[str, int]]) -> set[str]:
    """ms-swift v4 `swift/utils/transformers_utils.py::freeze_parameters` then `activate_parameters`
    (called for `tuner_type == 'full'` in `swift/pipelines/train/tuner.py`; `train_type` before v4).

    Start all trainable; `freeze_parameters_ratio` freezes the first `bisect_right(cumsum(numel),
    int(total * ratio))` parameters of `model.parameters()`; `freeze_parameters` prefixes (startswith) and
    `freeze_parameters_regex` (re.search) freeze; then `trainable_parameters` prefixes (startswith) and
    `trainable_parameters_regex` (re.search) make trainable again. `named_numels`: in model order.
    """
    if args.get("tuner_type", args.get("train_type")) != "full":
        raise RuleError("ms-swift applies the trainable/freeze parameter lists only with --tuner_type full")
    trainable = {n: True for n, _ in named_numels}
    ratio = float(args.get("freeze_parameters_ratio", 0))
    if ratio > 0:
        sizes = [numel for _, numel in named_numels]
        cut = bisect.bisect_right(list(itertools.accumulate(sizes)), int(sum(sizes) * ratio))
        for name, _ in named_numels[:cut]:
            trainable[name] = False
    for name in trainable:
        if any(name.startswith(p) for p in args.get("freeze_parameters", [])):
            trainable[name] = False
        if args.get("freeze_parameters_regex") and re.search(args["freeze_parameters_regex"], name):
            trainable[name] = False
    for name in trainable:
        if any(name.startswith(p) for p in args.get("trainable_parameters", [])):
            trainable[name] = True
        if args.get("trainable_parameters_regex") and re.search(args["trainable_parameters_regex"], name):
            trainable[name] = True
    return {n for n, on in trainable.items() if on}


@_trainer_raises
def peft_lora_targets(config: Mapping[str, Any], module_names: Sequence[str]) -> set[str]:
    """PEFT 0.21.2 `src/peft/tuners/tuners_utils.py::check_target_module_exists`: the modules that get an
    adapter.

    `exclude_modules` (str: re.fullmatch; list: exact or suffix) and `modules_to_save` entries m
    (`(^|.*\\.)m($|\\..*)`) exclude a module; a str `target_modules` is re.fullmatch'ed, a list target
    matches by exact name or suffix ".{t}"; with `layers_to_transform` (list targets only), the layer index
    is the first `(?:^|.*?\\.){layers_pattern}\\.(\\d+)\\.` group (any segment when no pattern) and must be
    in the list.
    """
    targets = config["target_modules"]
    out = set()
    for key in module_names:
        if _peft_excluded(config, key):
            continue
        if isinstance(targets, str):
            if re.fullmatch(targets, key):
                out.add(key)
            continue
        if not (key in targets or any(key.endswith(f".{t}") for t in targets)):
            continue
        if key not in targets and not _peft_layer_ok(config, key):
            continue
        out.add(key)
    return out


def _peft_excluded(config: Mapping[str, Any], key: str) -> bool:
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str):
        if re.fullmatch(exclude, key):
            return True
    elif exclude and (key in exclude or any(key.endswith(f".{e}") for e in exclude)):
        return True
    return any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.get("modules_to_save") or [])


def _peft_layer_ok(config: Mapping[str, Any], key: str) -> bool:
    layers = config.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    pattern = config.get("layers_pattern")
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


@_trainer_raises
def requires_grad(pattern: str, names: Sequence[str]) -> set[str]:
    """Plain PyTorch / the HF Trainer (transformers 5.x `Trainer.create_optimizer` keeps the parameters
    with `requires_grad`): the hf snippet sets it for names where `re.match(pattern, name)` succeeds."""
    rx = re.compile(pattern)
    return {n for n in names if rx.match(n)}


@_trainer_raises
def anchored_regex(pattern: str, names: Sequence[str]) -> set[str]:
    """The `regex` format's contract (no trainer's): one anchored pattern that selects the same names
    under re.match, re.search and re.fullmatch, so any tool's way of applying it agrees."""
    rx = re.compile(pattern)
    by_match = {n for n in names if rx.match(n)}
    if not by_match == {n for n in names if rx.search(n)} == {n for n in names if rx.fullmatch(n)}:
        raise RuleError(f"the pattern {pattern!r} selects different names under match, search and fullmatch")
    return by_match
