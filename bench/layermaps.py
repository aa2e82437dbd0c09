"""Layer maps as mergekit spells them, and the check that each output layer behaves like its source layer.

A layer map here is a plain SPEC of inclusive, ascending source ranges in output order (`0-23,8-31`: SOLAR's
depth up-scaling of 32 layers into 48), parsed independently of llamapro's own parser. mergekit's
`passthrough` merge does the same map with one slice per range (`layer_range` is end-exclusive).

The per-layer check reads each folder's config.json with transformers (the code that will run the model),
takes every layer's attention kind as transformers derives it (`layer_types`, written or derived from
legacy fields such as Qwen2's `max_window_layers` or Gemma 2's alternation) and its window, and compares
output layer j with its source layer. Families without per-layer fields (Llama) give every layer full
attention, so any map is trivially right there.

Used by `bench/relayer_bench.py` and `tests/test_mergekit_peer.py`. Must not: import llamapro (the check
is independent of the code it checks); transformers only inside `layer_attention`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The one config edit mergekit makes to a passthrough output (mergekit/merge.py `_model_out_config`:
# `set_config_value(res, num_layers_config_key, sum of slice lengths)`), for llama, qwen2 and gemma2.
MERGEKIT_COUNT_KEY = "num_hidden_layers"


def spec_ranges(spec: str) -> list[tuple[int, int]]:
    """'0-23,8-31' -> [(0, 24), (8, 32)]: each inclusive item as an end-exclusive range."""
    out = []
    for item in spec.split(","):
        first, _, last = item.strip().partition("-")
        a, b = int(first), int(last or first)
        if b < a:
            raise ValueError(f"range {item!r} runs backwards")
        out.append((a, b + 1))
    return out


def spec_sources(spec: str) -> list[int]:
    """The source layer of each output layer."""
    return [i for a, b in spec_ranges(spec) for i in range(a, b)]


def mergekit_slices(src: Path, spec: str, dtype: str) -> str:
    """A mergekit `passthrough` config (JSON, a subset of YAML) with one slice per range of `spec`."""
    slices = [{"sources": [{"model": str(src), "layer_range": [a, b]}]} for a, b in spec_ranges(spec)]
    return json.dumps({"merge_method": "passthrough", "dtype": dtype, "slices": slices}, indent=1)


def count_only_config(src: Path, layers: int) -> dict[str, Any]:
    """The source's config.json with only the layer count changed: the edit mergekit makes (on llama and
    mistral its output config differs from the input's by that key alone)."""
    config: dict[str, Any] = json.loads((src / "config.json").read_text())
    config[MERGEKIT_COUNT_KEY] = layers
    return config


def layer_attention(folder: Path) -> list[tuple[str, int | None]]:
    """(attention kind, window or None) of each layer, as transformers reads folder/config.json.
    ValueError (one line) when there is no config.json or transformers refuses it."""
    import transformers

    if not (folder / "config.json").is_file():
        raise ValueError("no config.json")
    try:
        config = transformers.AutoConfig.from_pretrained(folder).get_text_config()
    except Exception as e:  # transformers' validators raise several types; the last line says why
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = lines[-1] if lines else type(e).__name__
        raise ValueError(f"transformers refuses its config.json: {why}") from None
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    return [(kind, window if kind == "sliding_attention" else None) for kind in kinds]


def layer_config_mismatches(src: Path, out: Path, sources: list[int]) -> list[str]:
    """One line per output layer whose attention differs from its source layer's ([] when all agree)."""
    want, got = layer_attention(src), layer_attention(out)
    if len(got) != len(sources):
        return [f"the config has {len(got)} layers, the map {len(sources)}"]
    return [
        f"layer {j} (source {s}): {_kind(got[j])}, its source {_kind(want[s])}"
        for j, s in enumerate(sources)
        if got[j] != want[s]
    ]


def check_layer_config(src: Path, out: Path, sources: list[int]) -> str:
    """'yes', 'yes (no per-layer fields)' or 'no: why', in a few words for a table cell."""
    try:
        wrong = layer_config_mismatches(src, out, sources)
        kinds = {kind for kind, _ in layer_attention(src)}
    except ValueError as e:
        return f"no: {e}"
    if not wrong:
        return "yes" if kinds != {"full_attention"} else "yes (no per-layer fields)"
    more = ", …" if len(wrong) > 1 else ""
    return f"no: {len(wrong)} of {len(sources)} layers differ from their source ({wrong[0]}{more})"


def _kind(layer: tuple[str, int | None]) -> str:
    kind, window = layer
    return f"sliding (window {window})" if window else kind.replace("_attention", "")
