"""Numbers and lists read from option text: the one bounded integer parser and the quoting of a value.

Owns `parse_int` (ASCII digits, an optional minus, at most `MAX_DIGITS` of them), `shown` (how an error
message quotes a user's value) and `parse_after` (`--after 3,7,11`). Every option that spells a number
(`--after`, `--layers`, `--drop`, `--max-shard-size`, the integer options) reads it here.

Invariant: anything that is not a well-formed, bounded number is a one-line `UsageError` (exit 2).
Must not: know about plans, checkpoints or model families.
"""

from __future__ import annotations

import re

from llamapro_cli.errors import UsageError

# Digits only (a leading minus is allowed so `-1` is reported as out of range, not as junk); int() alone
# would also accept "1_0" and non-ASCII digits.
_INDEX = re.compile(r"-?[0-9]+")
# Every number an option spells (a layer index, a count, a byte size) fits in 18 digits (< 2**63). Longer
# text is refused before int() sees it: int() of thousands of digits is slow, then fails or overflows.
MAX_DIGITS = 18


def parse_int(text: str, *, option: str, what: str, hint: str) -> int:
    """The one place an option's number is read from text (`--after`, `--max-shard-size`): ASCII digits
    with an optional minus, at most `MAX_DIGITS` of them. Anything else is a `UsageError` (exit 2)."""
    item = text.strip()
    if not _INDEX.fullmatch(item):
        raise UsageError(f"{option}: {shown(item)} is not {what}", hint=hint)
    digits = len(item.lstrip("-"))
    if digits > MAX_DIGITS:
        message = f"{option}: a {digits}-digit number is out of range (at most {MAX_DIGITS} digits)"
        raise UsageError(message, hint=hint)
    return int(item)


def shown(text: str, limit: int = 40) -> str:
    """An option's value as an error message quotes it: repr, cut to `limit` characters."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}… ({len(text)} characters)"


def parse_after(text: str) -> tuple[int, ...]:
    """`"3, 7,11"` -> `(3, 7, 11)`, in the given order (the plan sorts). UsageError on junk or nothing."""
    items = [item.strip() for item in text.split(",")]
    if items == [""]:
        raise UsageError("--after needs at least one layer index", hint="e.g. --after 3,7,11")
    hint = "give comma-separated 0-based layer indices, e.g. --after 3,7,11"
    return tuple(parse_int(item, option="--after", what="a layer index", hint=hint) for item in items)
