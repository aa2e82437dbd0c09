"""What every trainer snippet shares: its formats, the `Snippet` value, the self-check and the comments.

`checked()` is the gate every renderer passes: the snippet is only returned when its trainer's rule
(`rules.py`) selects exactly the map's trainable parameters; otherwise `UsageError` (exit 2) names what
it would wrongly train or miss. The header, counts and pitfall comments are built here so every format
says the same things the same way.

Data in a snippet (the checkpoint path, tensor-derived names and patterns) comes from files a user may
not control, and the snippet is pasted into code that runs. `literal()` is the one way a value enters
snippet code (a Python or YAML double-quoted string, a shell word), and `comment()`/`comment_line()` the
one way text enters a comment (`one_line()` escapes every line break and control character, so a comment
never ends early). Renderers never interpolate a value by hand.

Invariant: a `Snippet` is only built from a selection its trainer's rule made; every value in its code
reads back as exactly that value in the snippet's language. Must not: print, import torch or the
trainers themselves.
"""

from __future__ import annotations

import re
import shlex
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
        comment_line(f"llamapro freeze-map {fm.checkpoint}"),
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
    return sum(numel.get(n, 0) for n in fm.trainable_parameters)  # a parameter without a tensor: none


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
    """`text` as comment lines wrapped at 100 columns (the same `#` comment in Python, YAML and shell)."""
    return textwrap.wrap(one_line(text), width=100, initial_indent="# ", subsequent_indent="#   ")


def comment_line(text: str) -> str:
    """`text` as one comment line, however long (a path must not be wrapped into pieces)."""
    return "# " + one_line(text)


def one_line(text: str) -> str:
    """`text` with every character that is not printable (line breaks of any convention: \\n, \\r,
    \\x85, \\u2028; other controls, bidi overrides) written as its backslash escape: one visible line."""
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    # \n, \r, \t, \xNN, \uNNNN, \UNNNNNNNN: code points, the same in Python and YAML double quotes.
    return ch.encode("unicode_escape").decode("ascii")


# --- values in snippet code ---------------------------------------------------------------------------


class Lang(StrEnum):
    """The languages snippets are written in."""

    PYTHON = "python"
    YAML = "yaml"
    SHELL = "shell"


Value = str | int | Sequence[str | int]
# YAML plain scalars that read back as the same string: a letter or "_" first (no indicator, number or
# sign), then only name characters (no ": ", " #", quotes, brackets or braces); not a YAML 1.1 bool/null.
_YAML_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_.$/-]*")
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}


def literal(lang: Lang, value: Value, *, regex: bool = False) -> str:
    """`value` (a string, an int or a list of them) spelled in `lang` so it reads back exactly.

    Python: a double-quoted string (a raw string for a `regex` that needs no escape), a list literal.
    YAML: a plain scalar when it cannot be read as anything else, else a double-quoted one; a flow list.
    Shell: one word (`shlex.quote`, or bash `$'...'` when it holds characters a terminal would act on).
    """
    if isinstance(value, int):
        return str(value)
    if not isinstance(value, str):
        items = [literal(lang, v, regex=regex) for v in value]
        return " ".join(items) if lang is Lang.SHELL else "[" + ", ".join(items) + "]"
    if lang is Lang.SHELL:
        return shlex.quote(value) if value.isprintable() else "$'" + _bash_quoted(value) + "'"
    if lang is Lang.YAML:
        plain = _YAML_PLAIN.fullmatch(value) and value.lower() not in _YAML_WORDS
        return value if plain else '"' + _quoted(value, '"') + '"'
    # A raw string keeps a regex readable; it cannot hold a quote, a line break or an odd trailing "\\".
    trailing = len(value) - len(value.rstrip("\\"))
    if regex and value.isprintable() and '"' not in value and trailing % 2 == 0:
        return 'r"' + value + '"'
    return '"' + _quoted(value, '"') + '"'


def _bash_quoted(value: str) -> str:
    """The inside of bash's `$'...'`: its `\\xHH` is a byte, not a code point, so a character that needs an
    escape is written as its UTF-8 bytes (a file name's own bytes: surrogateescape keeps undecodable ones)."""
    out = []
    for ch in value:
        if ch in ("'", "\\"):
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode("utf-8", "surrogateescape"))
    return "".join(out)


def _quoted(value: str, quote: str) -> str:
    """The inside of a `quote`-delimited string: backslash and the quote escaped, non-printables escaped."""
    return "".join(
        "\\" + ch if ch in (quote, "\\") else ch if ch.isprintable() else _escape(ch) for ch in value
    )
