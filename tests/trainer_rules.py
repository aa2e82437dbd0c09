"""Each trainer's rule for choosing trainable parameters, re-implemented from its source for the tests.

These are deliberately written from the trainers' code (cited per function, see
../shared/reference/trainers.md §2), not from llamapro's renderers, so a renderer is checked against an
independent reading of the rule. Each function takes the snippet's values and the model's real
`named_parameters()` names (in order) and returns the names the trainer would leave trainable.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any


def axolotl(unfrozen_parameters: Sequence[str], names: Sequence[str]) -> set[str]:
    """axolotl-ai-cloud/axolotl `src/axolotl/utils/freeze.py`: `freeze_layers_except` + `LayerNamePattern`.

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


def llama_factory(
    config: dict[str, Any], names: Sequence[str], num_layers: int, *, lora: bool = False
) -> set[str]:
    """hiyouga/LLaMA-Factory `src/llamafactory/model/adapter.py::_setup_freeze_tuning` (freeze tuning).

    `use_llama_pro`: ValueError unless L % K == 0; stride = L // K; ids = range(stride-1, L+stride-1,
    stride). Otherwise K > 0 is the last K layers, K <= 0 the first |K|. Module names are validated
    (`freeze_trainable_modules` against the names after ".0."/".1.", `freeze_extra_modules` against
    `name.split(".")[-2]` of names without a ".<digits>." part), then a parameter is trainable when any of
    ".{id}.{module}" (module "" for "all") or an extra module name is a *substring* of its name.
    """
    k = int(config["freeze_trainable_layers"])
    if config.get("use_llama_pro"):
        if num_layers % k != 0:
            raise ValueError(f"`num_layers` {num_layers} should be divisible by `num_layer_trainable` {k}.")
        stride = num_layers // k
        ids = range(stride - 1, num_layers + stride - 1, stride)
    elif k > 0:
        ids = range(max(0, num_layers - k), num_layers)
    else:
        ids = range(min(-k, num_layers))
    hidden, non_hidden = set(), set()
    for name in names:
        if ".0." in name:
            hidden.add(name.split(".0.")[-1].split(".")[0])
        elif ".1." in name:
            hidden.add(name.split(".1.")[-1].split(".")[0])
        if re.search(r"\.\d+\.", name) is None:
            non_hidden.add(name.split(".")[-2])
    modules = [m.strip() for m in str(config.get("freeze_trainable_modules", "all")).split(",")]
    trainable_layers = []
    for module in modules:
        if module != "all" and module not in hidden:
            raise ValueError(f"Module {module} is not found")
        trainable_layers += [".{:d}.{}".format(i, module if module != "all" else "") for i in ids]
    extras = config.get("freeze_extra_modules")
    for module in [m.strip() for m in str(extras).split(",")] if extras else []:
        if module not in non_hidden:
            raise ValueError(f"Module {module} is not found, please choose from {', '.join(non_hidden)}")
        trainable_layers.append(module)
    return {n for n in names if any(t in n for t in trainable_layers)}


def swift(args: dict[str, Any], named_numels: Sequence[tuple[str, int]]) -> set[str]:
    """modelscope/ms-swift `swift/utils/transformers_utils.py::freeze_parameters` then
    `activate_parameters` (called for `tuner_type == 'full'` in `swift/pipelines/train/tuner.py`).

    Start all trainable; `freeze_parameters_ratio` freezes the first `bisect_right(cumsum(numel),
    int(total * ratio))` parameters of `model.parameters()`; `freeze_parameters` prefixes (startswith) and
    `freeze_parameters_regex` (re.search) freeze; then `trainable_parameters` prefixes (startswith) and
    `trainable_parameters_regex` (re.search) make trainable again.
    """
    import bisect
    import itertools

    assert args.get("tuner_type", args.get("train_type")) == "full", "the lists apply only to full tuning"
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


def peft_lora_targets(config: dict[str, Any], module_names: Sequence[str]) -> set[str]:
    """huggingface/peft `src/peft/tuners/tuners_utils.py::check_target_module_exists` (list targets).

    A module is excluded when a `modules_to_save` entry m matches `(^|.*\\.)m($|\\..*)`; a list target
    matches by exact name or suffix ".{t}"; with `layers_to_transform`, the layer index is the first
    `(?:^|.*?\\.){layers_pattern}\\.(\\d+)\\.` group and must be in the list.
    """
    targets = config["target_modules"]
    layers = config.get("layers_to_transform")
    pattern = config.get("layers_pattern")
    out = set()
    for key in module_names:
        if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.get("modules_to_save") or []):
            continue
        if not (key in targets or any(key.endswith(f".{t}") for t in targets)):
            continue
        if layers is not None:
            rx = rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\." if pattern else r".*?\.[^.]*\.(?P<idx>\d+)\."
            m = re.match(rx, key)
            if m is None or int(m.group("idx")) not in layers:
                continue
        out.add(key)
    return out


def regex(pattern: str, names: Sequence[str]) -> set[str]:
    """The `regex` format's contract: one anchored pattern, the same under match, search and fullmatch."""
    rx = re.compile(pattern)
    by_match = {n for n in names if rx.match(n)}
    assert by_match == {n for n in names if rx.search(n)} == {n for n in names if rx.fullmatch(n)}
    return by_match
