"""A layer map as text: the SPEC of `relayer --layers` and `--drop`, and a map's canonical spelling.

A SPEC lists the output's layers in order, each a 0-based source layer or an inclusive, ascending range
of them: `0-23,8-31` (SOLAR's depth up-scaling of 32 layers into 48), `0-9,8-31` (repeat 8 and 9),
`0-9,12-31` (drop 10 and 11). A `z` suffix (`3z`, `4-7z`) makes zeroed identity copies: the branch-final
tensors are zero, as `expand` writes its copies. Whitespace around items, dashes and `z` is ignored.
`format_spec` writes a map back in the shortest such form, so a record's `spec` is canonical.

Invariant: `parse_spec(format_spec(m), n) == m` for every map `m` of sources below n; anything malformed,
empty or out of range is a one-line `UsageError` (exit 2) naming the item.
Must not: know about plans (`plan.py` builds them from these entries), checkpoints or model families.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

from llamapro_cli.errors import UsageError
from llamapro_cli.option_text import parse_int, shown

Entry = tuple[int, bool]  # (source layer, zeroed identity copy)

# Tensor names carry at most 6 index digits (architectures.record): a map of a million layers or more
# could not be read back, so it is refused before a list that long is built.
MAX_LAYERS = 1_000_000
_ITEM = re.compile(r"([^-\s]+)(?:\s*-\s*(\S+))?")
SPEC_HINT = (
    "list 0-based source layers and ascending ranges in output order, e.g. --layers 0-23,8-31 "
    "(a z suffix makes a zeroed copy: 3z, 4-7z)"
)


def parse_spec(text: str, num_layers: int, *, option: str = "--layers") -> tuple[Entry, ...]:
    """`"0-2, 1-3, 2z"` -> ((0, F), (1, F), (2, F), (1, F), (2, F), (3, F), (2, T)) for a model of
    `num_layers` layers."""
    entries: list[Entry] = []
    for first, last, zeroed in _items(text, num_layers, option=option, zeroed_ok=True):
        if len(entries) + last - first + 1 > MAX_LAYERS:
            raise UsageError(f"{option}: the map has over {MAX_LAYERS:,} layers", hint=SPEC_HINT)
        entries.extend((source, zeroed) for source in range(first, last + 1))
    return tuple(entries)


def parse_drop(text: str, num_layers: int) -> tuple[int, ...]:
    """`--drop 10,11` (ranges too: `10-13`) -> the sorted, distinct layers to drop; at least one layer
    must remain."""
    hint = "give comma-separated 0-based layer indices or ranges, e.g. --drop 10,11 or --drop 10-13"
    dropped = sorted(
        {
            i
            for first, last, _ in _items(text, num_layers, option="--drop", hint=hint)
            for i in range(first, last + 1)
        }
    )
    if len(dropped) == num_layers:
        raise UsageError(f"--drop would drop all {num_layers} layers", hint="keep at least one layer")
    return tuple(dropped)


def format_spec(entries: Iterable[Entry]) -> str:
    """The shortest SPEC of a map: runs of consecutive sources of one kind become ranges."""
    runs: list[list[int | bool]] = []  # [first, last, zeroed]
    for source, zeroed in entries:
        if runs and runs[-1][2] == zeroed and runs[-1][1] == source - 1:
            runs[-1][1] = source
        else:
            runs.append([source, source, zeroed])
    return ",".join(
        (f"{first}" if first == last else f"{first}-{last}") + ("z" if zeroed else "")
        for first, last, zeroed in runs
    )


def identity_problem(entries: Sequence[Entry], num_layers: int) -> str | None:
    """Why a map is not an identity map (every layer once, in order, unzeroed; the rest zeroed copies),
    in a few words; None when it is one."""
    kept = [source for source, zeroed in entries if not zeroed]
    counts = Counter(kept)
    missing = [i for i in range(num_layers) if i not in counts]
    if missing:
        return f"it drops {_layers(missing)}"
    repeated = sorted(i for i, n in counts.items() if n > 1)
    if repeated:
        return f"it repeats {_layers(repeated)} unzeroed"
    if kept != sorted(kept):
        return "it reorders layers"
    return None


def _layers(indices: Sequence[int]) -> str:
    shown_ = ", ".join(map(str, indices[:8])) + (", …" if len(indices) > 8 else "")
    return f"layer {shown_}" if len(indices) == 1 else f"layers {shown_}"


def _items(
    text: str, num_layers: int, *, option: str, zeroed_ok: bool = False, hint: str = SPEC_HINT
) -> list[tuple[int, int, bool]]:
    """(first, last, zeroed) of each comma-separated item, checked against `num_layers`."""
    if not text.strip():
        raise UsageError(f"{option} needs at least one layer", hint=hint)
    out = []
    for raw in text.split(","):
        item = raw.strip()
        zeroed = zeroed_ok and item[-1:] in ("z", "Z")
        body = item[:-1].rstrip() if zeroed else item
        m = _ITEM.fullmatch(body)
        if not item or m is None:
            what = "an empty item" if not item else f"{shown(item)} is not a layer or a range"
            raise UsageError(f"{option}: {what}", hint=hint)
        first = parse_int(m.group(1), option=option, what="a layer index", hint=hint)
        last = (
            first
            if m.group(2) is None
            else parse_int(m.group(2), option=option, what="a layer index", hint=hint)
        )
        for index in (first, last):
            if not 0 <= index < num_layers:
                raise UsageError(
                    f"{option}: layer {index} is out of range for a checkpoint with {num_layers} layers",
                    hint=f"layer indices are 0-based: 0 to {num_layers - 1}",
                )
        if last < first:
            raise UsageError(
                f"{option}: the range {first}-{last} runs backwards",
                hint=f"ranges run upwards ({last}-{first}); to reverse layers list them one by one",
            )
        out.append((first, last, zeroed))
    return out
