"""The config rewrite: `rewrite_config(family, config, plan)` gives the expanded config.json.

Only what the surgery requires changes: the layer count (in `text_config` for multimodal configs) and
every per-layer field of the family record, remapped by source so each original layer keeps its
behaviour and each copy behaves like its source: written as explicit lists even when the input derived
them from a formula; derivation fields made consistent or dropped; layer-indexed names inside
`quantization_config` remapped. A layout the config cannot express is refused (UsageError, exit 2)
before any byte is written; unknown per-layer lists are refused (exit 3). Every other key and value,
and the key order, is kept.

Must not: read files, import torch or transformers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from llamapro_cli.architectures.layers import (
    effective_values,
    is_active,
    pattern_message,
    short_list,
    without_key,
)
from llamapro_cli.architectures.record import Config, Family, FieldKind, LayerField
from llamapro_cli.architectures.registry import (
    QUANT_NAME_KEYS,
    extra_layers,
    fields_of,
    quantization_layer_index,
    quantization_layer_pattern,
)
from llamapro_cli.errors import UnsupportedError, UsageError
from llamapro_cli.plan import ExpansionPlan, PlanKind


def rewrite_config(family: Family, config: Config, plan: ExpansionPlan) -> tuple[dict[str, Any], list[str]]:
    """The expanded config and warnings: count updated, every per-layer field remapped by source.

    Only the keys the surgery requires change; every other key and value is kept in order. Raises
    UsageError (exit 2) when the config cannot express the plan, UnsupportedError (exit 3) for fields
    llamapro cannot remap; both before anything is written.
    """
    new = _deep_copy(config)
    sub = _sub_dict(family, new)
    old = family.sub_config(config)  # read every field from the untouched original
    n = plan.num_layers_in
    sources = [layer.source for layer in plan.layers]
    warnings: list[str] = []
    _refuse_unknown_lists(family, old, n)
    written: list[tuple[LayerField, list[Any], list[Any]]] = []
    for fld in fields_of(family):
        values = effective_values(fld, old, n) if is_active(fld, old) else None
        if values is None:
            continue
        remapped = [values[s] for s in sources]
        warning = _write_field(family, fld, sub, remapped, plan)
        if warning and (fld.relevant is None or fld.relevant(old)):
            warnings.append(warning)
        written.append((fld, values, remapped))
    if family.count_key in old or not family.count_list:
        sub[family.count_key] = plan.num_layers_out
    for key in family.drop_keys:
        sub.pop(key, None)
    for key, value in family.set_keys:
        sub[key] = value
    _check_virtual(family, sub, written, plan)
    warnings += _broken_patterns(family, old, sub, written, plan)
    warnings += _remap_quantization(family, new, plan)
    warnings += _extra_layer_notes(family, old, plan)
    return new, warnings


def _write_field(
    family: Family, fld: LayerField, sub: dict[str, Any], values: list[Any], plan: ExpansionPlan
) -> str | None:
    if fld.kind is FieldKind.VIRTUAL:
        return None
    if fld.kind is FieldKind.LIST:
        sub[fld.key] = values
        return None
    if fld.kind is FieldKind.PATTERN:
        sub[fld.key] = "".join(values)
        return None
    if fld.kind is FieldKind.INDEX_SET:
        sub[fld.key] = [j for j, member in enumerate(values) if member]
        return None
    count = sum(1 for v in values if v)
    if all(values[:count]) and not any(values[count:]):
        sub[fld.key] = count
        return None
    if fld.required and plan.kind is PlanKind.LAYERS:
        raise UsageError(
            f"this layer map cannot be expressed for {family.name}: {fld.key} needs the layers below a "
            f"threshold to stay a prefix, and the map puts {_prefix_breakers(values)} after a layer that "
            "is not below it",
            hint=f"keep the layers below {fld.key} together at the start of the map",
        )
    if fld.required:
        raise UsageError(
            f"this plan cannot be expressed for {family.name}: {fld.key} needs the layers below a "
            "threshold to stay a prefix, and the plan puts a copy of one of them after a later layer",
            hint="place copies right after their source (--every or --after)",
        )
    sub[fld.key] = count
    return (
        f"{fld.key} cannot describe this layout as a threshold; the explicit per-layer lists in "
        "config.json carry it (engines that ignore them would run a different model)"
    )


def _check_virtual(
    family: Family, sub: Config, written: list[tuple[LayerField, list[Any], list[Any]]], plan: ExpansionPlan
) -> None:
    """Per-layer behaviour no config field can state (index arithmetic) must survive the new numbering."""
    for fld, _, remapped in written:
        if fld.kind is not FieldKind.VIRTUAL or fld.derive is None:
            continue
        got = fld.derive(sub, plan.num_layers_out)
        bad = [j for j in range(plan.num_layers_out) if got[j] != remapped[j]]
        if bad and plan.kind is PlanKind.LAYERS:
            raise UsageError(
                f"this layer map cannot be expressed for {family.name}: its config derives each layer's "
                f"kind from the index ({fld.key}), and output layers {short_list(bad)} would change kind",
                hint=f"map layers to indices of the same kind (the kinds repeat every {_period(got)} layers)",
            )
        if bad:
            period = _period(got)
            raise UsageError(
                f"this plan cannot be expressed for {family.name}: its config derives each layer's kind "
                f"from the index ({fld.key}), and new layers {short_list(bad)} would change kind",
                hint=f"insert whole periods: --every {period} --copies {period} keeps every layer's kind",
            )


def _prefix_breakers(values: list[Any]) -> str:
    """The output layers that are "below" the threshold but come after one that is not."""
    first_off = next((j for j, member in enumerate(values) if not member), len(values))
    late = [j for j in range(first_off, len(values)) if values[j]]
    return f"output layer{'s' if len(late) > 1 else ''} {short_list(late)}"


def _period(values: Sequence[Any]) -> int:
    return next(
        (p for p in range(1, len(values)) if all(values[i] == values[i % p] for i in range(len(values)))),
        len(values),
    )


def _broken_patterns(
    family: Family,
    old: Config,
    sub: Config,
    written: list[tuple[LayerField, list[Any], list[Any]]],
    plan: ExpansionPlan,
) -> list[str]:
    out = []
    for fld, values, remapped in written:
        if not fld.periodic or fld.derive is None:
            continue
        followed = fld.derive(without_key(old, fld.key), plan.num_layers_in) == values
        formula = fld.derive(without_key(sub, fld.key), plan.num_layers_out)
        if followed and formula != remapped:
            bad = [j for j in range(plan.num_layers_out) if formula[j] != remapped[j]]
            out.append(pattern_message(family, fld, bad))
    return out


def _remap_quantization(family: Family, config: dict[str, Any], plan: ExpansionPlan) -> list[str]:
    """Layer-indexed module names in quantization_config follow their layer (copies included)."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        return []
    pattern = quantization_layer_pattern(family)
    new_of: dict[int, list[int]] = {}
    for layer in plan.layers:
        new_of.setdefault(layer.source, []).append(layer.index)
    for dropped in range(plan.num_layers_in):
        new_of.setdefault(dropped, [])  # a dropped layer's names go with it
    shift = plan.num_layers_out - plan.num_layers_in  # extra (MTP) layers beyond the blocks move
    for key in QUANT_NAME_KEYS:
        names = qc.get(key)
        if isinstance(names, list):
            qc[key] = [out for name in names for out in _remap_name(name, pattern, new_of, shift)]
    return []


def _remap_name(name: Any, pattern: re.Pattern[str], new_of: dict[int, list[int]], shift: int) -> list[Any]:
    m = pattern.search(name) if isinstance(name, str) else None
    index = None if m is None else quantization_layer_index(m)
    if m is None or index is None:  # a malformed index was refused when the config was read
        return [name]
    targets = new_of.get(index, [index + shift])
    return [name[: m.start(2)] + str(j) + name[m.end(2) :] for j in targets]


def _extra_layer_notes(family: Family, old: Config, plan: ExpansionPlan) -> list[str]:
    count = extra_layers(family, old) if family.extra_layers_key else 0
    if not count:
        return []
    n_in, n_out = plan.num_layers_in, plan.num_layers_out
    return [
        f"{family.extra_layers_key} = {count}: multi-token-prediction layers at "
        f"{family.layer_prefix}{n_in}.. (if present) are not blocks and move to "
        f"{family.layer_prefix}{n_out}..; transformers' own loader "
        "and MTP drafting look for them only at their hard-coded original index, so they ignore them"
    ]


def _refuse_unknown_lists(family: Family, sub: Config, n: int) -> None:
    known = {f.key for f in fields_of(family)}
    if sub.get("per_layer_config"):
        raise UnsupportedError(
            "config.json: per_layer_config overrides individual layers and llamapro does not remap it yet",
            hint="please report this config",
        )
    for key, value in sub.items():
        if n > 1 and isinstance(value, list) and len(value) == n and key not in known | _NOT_PER_LAYER:
            raise UnsupportedError(
                f"config.json: {key} has one entry per layer and llamapro does not know how to remap it",
                hint="please report this config; it may change per-layer behaviour",
            )


# List-valued keys whose length can equal the layer count by coincidence.
_NOT_PER_LAYER = frozenset(
    {
        "architectures",
        "bad_words_ids",
        "suppress_tokens",
        "eos_token_id",
        "time_step_limit",
        "mlp_multipliers",
        "ssm_multipliers",
        "mtp_layers_block_type",
        "mrope_section",
    }
)


def _sub_dict(family: Family, config: dict[str, Any]) -> dict[str, Any]:
    sub = config
    for key in family.config_path:
        sub = sub[key]
    return sub


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
