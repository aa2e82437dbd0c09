"""The registry: which record describes a config (`family_for`), what is refused, and what the config
must hold before any record is applied to it.

`family_for` finds the record for a config's `model_type`, then checks, once, every config value the
record reads (the layer count, each per-layer field, each key a formula or refusal reads, the
multimodal sub-config, the quantization name lists) against the kind the record declares, and applies
the refusals (whole families, config-dependent rules, the quantization policy): all exit 3 naming the
key and value, before anything is computed from them. Also here: the layer count, the layer-indexed
extras past the blocks (DeepSeek-V3 MTP layers) and their renumbering.

Invariant: a record that `family_for` returned can be applied to that config without a type error or a
division by zero. Must not: branch per family (records say everything), read files, import torch or
transformers.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from itertools import chain

from llamapro_cli.architectures.families import FAMILIES
from llamapro_cli.architectures.parts import GENERIC_FIELDS
from llamapro_cli.architectures.record import (
    MAX_INDEX_DIGITS,
    Config,
    ConfigKey,
    Family,
    LayerField,
    ValueKind,
)
from llamapro_cli.errors import UnsupportedError

COMPAT_DOC = "docs/compatibility.md"

# Quantization methods whose zero is not all-zero bytes (packed integers with zero-points).
REFUSED_QUANTIZATION = ("gptq", "awq", "bitsandbytes", "bnb", "aqlm", "eetq", "hqq", "quanto", "exl2")
ALLOWED_QUANTIZATION = ("fp8", "mxfp4", "compressed-tensors-fp8", "fbgemm_fp8")
# quantization_config keys that list module names (possibly layer-indexed, possibly "re:" regexes).
QUANT_NAME_KEYS = ("ignore", "modules_to_not_convert", "ignored_layers")
_QUANT_KEYS = (
    ConfigKey("quant_method", ValueKind.STRING),
    *(ConfigKey(key, ValueKind.STRINGS) for key in QUANT_NAME_KEYS),
)


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES if not f.refuse for t in f.model_types)


def family_for(config: Config) -> Family:
    """The record for a config's `model_type`, its values checked; exit 3 with a hint otherwise."""
    model_type = config.get("model_type")
    for fam in FAMILIES:
        if model_type in fam.model_types:
            _refuse(fam.refuse, str(model_type))
            check_config(fam, config)
            _refuse(fam.refusal(fam.sub_config(config)) if fam.refusal else None, str(model_type))
            _check_quantization(config, str(model_type))
            return fam
    arch = (config.get("architectures") or ["?"])[0]
    raise UnsupportedError(
        f"unsupported architecture: model_type {model_type!r} ({arch})",
        hint="supported model types: " + ", ".join(supported_model_types()),
    )


def _refuse(reason: str | None, model_type: str) -> None:
    if reason:
        raise UnsupportedError(
            f"refused {model_type}: {reason}",
            hint="an inserted copy cannot be an exact identity here; see docs/architectures.md",
        )


def _check_quantization(config: Config, model_type: str) -> None:
    qc = config.get("quantization_config")
    if not qc:
        return
    method = str(qc.get("quant_method", "unknown")).lower() if isinstance(qc, Mapping) else "unknown"
    if method in ALLOWED_QUANTIZATION:
        return
    raise UnsupportedError(
        f"refused quantization {method!r} on {model_type}: zeroing packed integer weights with "
        "zero-points does not give zero",
        hint="expand the unquantized checkpoint, then quantize the result",
    )


# --- the config a record reads --------------------------------------------------------------------------


def fields_of(family: Family) -> tuple[LayerField, ...]:
    """Generic fields first, then the family's (a family record overrides a generic field by key)."""
    own = {f.key for f in family.layer_fields}
    return (*(f for f in GENERIC_FIELDS if f.key not in own), *family.layer_fields)


def config_keys(family: Family) -> tuple[ConfigKey, ...]:
    """Every (sub-)config key the record reads, with its declared kind (first declaration wins)."""
    keys = [ConfigKey(family.count_key, ValueKind.POSITIVE)]
    if family.extra_layers_key:
        keys.append(ConfigKey(family.extra_layers_key, ValueKind.COUNT))
    keys += [key for fld in fields_of(family) for key in fld.reads()]
    keys += family.reads
    first: dict[str, ConfigKey] = {}
    for key in keys:
        first.setdefault(key.key, key)
    return tuple(first.values())


def check_config(family: Family, config: Config) -> None:
    """Every value the record reads has its declared kind (null counts as absent); exit 3 naming the
    first that does not. Run once, by `family_for`, before anything is derived from the config."""
    problem = next(chain(_problems(family, config), _quantization_problems(family, config)), None)
    if problem:
        raise UnsupportedError(f"config.json: {problem}", hint="fix or remove that value in config.json")


def _problems(family: Family, config: Config) -> Iterator[str]:
    where = ""
    for path_key in family.config_path:
        problem = ConfigKey(path_key, ValueKind.OBJECT).problem(config, where)
        if problem:
            yield problem
            return
        config, where = config.get(path_key) or {}, f"{where}{path_key}."
    for key in config_keys(family):
        problem = key.problem(config, where)
        if problem:
            yield problem


def _quantization_problems(family: Family, config: Config) -> Iterator[str]:
    qc = config.get("quantization_config")
    if not isinstance(qc, Mapping):
        return
    for spec in _QUANT_KEYS:
        problem = spec.problem(qc, "quantization_config.")
        if problem:
            yield problem
            return
    pattern = quantization_layer_pattern(family)
    for key in QUANT_NAME_KEYS:
        for name in qc.get(key) or ():
            for m in pattern.finditer(name):
                if quantization_layer_index(m) is None:
                    yield f"quantization_config.{key} entry {_shown(name)} has a malformed layer index"
                    return


def quantization_layer_pattern(family: Family) -> re.Pattern[str]:
    """Layer-indexed module names in `quantization_config` lists: any of the record's prefixes (its
    alternative layout's and the in-memory one included), dots possibly regex-escaped, then an index."""
    prefixes = dict.fromkeys(
        p for p in (family.layer_prefix, family.alternative().layer_prefix, family.memory_prefix) if p
    )
    alternatives = "|".join(re.escape(p).replace(r"\.", r"\\?\.") for p in prefixes)
    return re.compile(f"({alternatives})([0-9]+)(?=\\\\?\\.|$)")


def quantization_layer_index(match: re.Match[str]) -> int | None:
    """The layer index a `quantization_layer_pattern` match names; None when not canonical."""
    digits = match.group(2)
    if len(digits) > MAX_INDEX_DIGITS or (digits.startswith("0") and digits != "0"):
        return None
    return int(digits)


def _shown(value: str) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- layer counts ---------------------------------------------------------------------------------------


def num_layers(family: Family, config: Config) -> int | None:
    sub = family.sub_config(config)
    value = sub.get(family.count_key)
    if value is None and family.count_list and isinstance(sub.get(family.count_list), list):
        return len(sub[family.count_list])
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def extra_layers(family: Family, config: Config) -> int:
    """How many layer-indexed non-block modules (DeepSeek-V3 MTP) sit at indices n, n+1, ..."""
    if family.extra_layers_key is None:
        return 0
    value = family.sub_config(config).get(family.extra_layers_key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def renumber_extra(family: Family, name: str, n_in: int, n_out: int) -> str:
    """A non-block tensor's output name: extra layers at n_in + m move to n_out + m (MTP layers)."""
    parts = family.split_name(name)
    if parts is None or parts[0] < n_in:
        return name
    return f"{family.layer_prefix}{parts[0] - n_in + n_out}.{parts[1]}"
