"""What every trainer snippet shares: its formats, the `Snippet` value, the self-check and the comments.

`checked()` is the gate every renderer passes: the snippet is only returned when its trainer's rule
(`rules.py`) selects exactly the map's trainable parameters; otherwise `UsageError` (exit 2) names what
it would wrongly train or miss. The header, counts and pitfall comments are built here so every format
says the same things the same way.

Invariant: a `Snippet` is only built from a selection its trainer's rule made. Must not: print, import
torch or the trainers themselves.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import NoReturn

from llamapro_cli.errors import UsageError
from llamapro_cli.freeze.map import FreezeMap, Role


class Format(StrEnum):
    """What `freeze-map --format` prints: a summary, the manifest, a name list or a trainer snippet."""

    TEXT = "text"
    NAMES = "names"
    JSON = "json"
    REGEX = "regex"
    AXOLOTL = "axolotl"
    LLAMA_FACTORY = "llama-factory"
    PEFT = "peft"
    SWIFT = "swift"
    HF = "hf"


def parse_format(text: str) -> Format:
    try:
        return Format(text.strip().lower())
    except ValueError:
        raise UsageError(
            f"--format: unknown format {text!r}", hint="formats: " + ", ".join(f.value for f in Format)
        ) from None


@dataclass(frozen=True)
class Snippet:
    """A rendered snippet and what its trainer's rule selects on the map's parameter names."""

    format: Format
    text: str  # stdout: paste-ready
    selected: tuple[str, ...]  # parameter names (peft: module names that get an adapter)
    tensors: int  # trainable tensors under the trainer's rule
    parameters: int  # trainable parameters under the trainer's rule
    notes: tuple[str, ...]  # for stderr


def all_parameters(fm: FreezeMap) -> tuple[str, ...]:
    """Every in-memory parameter name of the map, trainable first."""
    return (*fm.trainable_parameters, *fm.frozen_parameters)


def checked(fm: FreezeMap, fmt: Format, selected: Sequence[str], text: str, notes: Sequence[str]) -> Snippet:
    """Refuse unless the trainer's rule selected exactly the map's trainable parameters."""
    want, got = set(fm.trainable_parameters), set(selected)
    if got != want:
        refuse(fmt, sorted(got - want), sorted(want - got))
    numel = fm.parameter_numel()
    return Snippet(fmt, text, tuple(selected), len(got), sum(numel[n] for n in got), tuple(notes))


def refuse(fmt: Format, extra: Sequence[str], missing: Sequence[str]) -> NoReturn:
    detail = []
    if extra:
        detail.append(f"it would also train {few(extra)}")
    if missing:
        detail.append(f"it would miss {few(missing)}")
    raise UsageError(
        f"--format {fmt.value} cannot express this trainable set: {'; '.join(detail)}",
        hint="use --format axolotl, swift or hf (exact layer lists), or names/json",
    )


def few(names: Sequence[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def layer_ids(fm: FreezeMap) -> str:
    return ", ".join(map(str, fm.new_layers))


def role_parameters(fm: FreezeMap) -> list[str]:
    """Trainable parameters outside the new layers (the `--also` roles), in map order."""
    prefixes = tuple(f"{fm.memory_prefix}{i}." for i in fm.new_layers)
    return [n for n in fm.trainable_parameters if not n.startswith(prefixes)]


def header(fm: FreezeMap, snippet_counts: str) -> list[str]:
    also = f" + {', '.join(fm.also)}" if fm.also else ""
    return [
        f"# llamapro freeze-map {fm.checkpoint}",
        *comment(f"trains new layers {layer_ids(fm)} of {fm.num_layers}{also} ({fm.found_by})"),
        *comment(snippet_counts),
    ]


def counts(fm: FreezeMap, rule: str) -> str:
    return (
        f"checked with {rule}: {len(fm.trainable_parameters)} trainable tensors, "
        f"{_trainable_numel(fm):,} trainable parameters"
    )


def _trainable_numel(fm: FreezeMap) -> int:
    numel = fm.parameter_numel()
    return sum(numel[n] for n in fm.trainable_parameters)


def pitfalls(fm: FreezeMap, *, checkpointing: str) -> list[str]:
    """The pitfalls that apply, as wrapped comment lines: reentrant checkpointing with frozen
    embeddings (no gradient reaches the new layers), ZeRO-3 / FSDP with partially frozen models."""
    texts = []
    if Role.EMBEDDINGS.value not in fm.also:
        texts.append(
            f"Gradient checkpointing: {checkpointing}. With reentrant checkpointing and frozen "
            "embeddings no gradient reaches the new layers and training silently does nothing."
        )
    texts.append(
        "ZeRO-3 / FSDP: freeze before the model is wrapped (deepspeed.initialize, accelerator.prepare). "
        "FSDP1 with use_orig_params=false needs each unit all-frozen or all-trainable: wrap per decoder "
        "layer. ZeRO-3 + non-reentrant checkpointing + frozen parameters needs DeepSpeed with PR #8130."
    )
    return [line for text in texts for line in comment(text)]


def comment(text: str) -> list[str]:
    return textwrap.wrap(text, width=100, initial_indent="# ", subsequent_indent="#   ")
