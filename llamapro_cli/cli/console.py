"""The CLI's two streams: data on stdout (tables, JSON documents), messages and progress on stderr.

Owns every write the CLI makes: `error`/`warn`/`note` (one line each on stderr), `print_json` (exactly
`asdict(report)` plus `schema_version`, so the library, the JSON and the table cannot drift apart),
`print_rows`/`print_table`/`print_line`/`print_text` (the human output) and `progress` (a rich bar on a
terminal, a plain line every ~10 s otherwise, so CI logs show life). The number formats the tables
share live here too.

Invariant: stdout carries data only, so it pipes; everything else goes to stderr. Data is never markup
and never reaches the terminal raw: every string passes `clean()` (control characters as visible
escapes) and rich only ever receives `Text` objects, so a file or tensor name cannot style the terminal,
draw a fake `error:` line or crash a renderer. A failed write to stdout is `OutputError` (exit 4).
`NO_COLOR` removes all styling; on a pipe, tables are plain text.
Must not: be imported by library modules; decide exit codes (`app` maps errors to them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from llamapro_cli.errors import OutputError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance
    from rich.console import Console

JSON_SCHEMA_VERSION = 1
PROGRESS_INTERVAL_S = 10.0

Progress = Callable[[int, int], None]  # (done, total), as the library's verbs take it

# What a terminal acts on instead of showing: C0 and C1 controls and DEL (ESC sequences, BEL, CR, the
# 8-bit CSI), and the Unicode controls that break or reorder a line (line and paragraph separators,
# bidi embeddings, overrides and isolates). Each is shown as an escape, as repr() writes it.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_UNSAFE_IN_TEXT = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def clean(text: str, *, lines: bool = False) -> str:
    """`text` with every character a terminal would act on shown as an escape (`\\x1b`, `\\r`, `\\u202e`).

    The one function every printed string passes through. `lines=True` keeps line breaks and tabs (a
    trainer snippet is several lines); otherwise they are escaped too, so one value stays one line.
    """
    return (_UNSAFE_IN_TEXT if lines else _UNSAFE).sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


# --- stderr: one line per message -----------------------------------------------------------------------


def error(message: str, hint: str | None = None) -> None:
    # Plain writes: the error contract is exact text, never wrapped or styled.
    _stderr_line(f"error: {message}")
    if hint:
        _stderr_line(f"hint: {hint}")


def warn(message: str) -> None:
    _stderr_line(f"warning: {message}")


def note(message: str) -> None:
    _stderr_line(message)


def _stderr_line(text: str) -> None:
    try:
        sys.stderr.write(clean(text) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr itself is gone: nothing is left to tell; the exit code says it
        pass


# --- stdout: data ---------------------------------------------------------------------------------------


def print_line(text: str) -> None:
    """One line of data (`verdict: …`, `changed: <tensor> (<why>)`), never wrapped."""
    _write(clean(text) + "\n")


def print_text(text: str) -> None:
    """Data of several lines as it is (a paste-ready trainer snippet), its lines cleaned."""
    _write(clean(text, lines=True))


def flush() -> None:
    """Push out what stdout still buffers; a failure is `OutputError`, not a message at interpreter exit."""
    try:
        sys.stdout.flush()
    except OSError as e:
        _stdout_failed(e)
    except ValueError:  # closed
        pass


def _write(text: str) -> None:
    try:
        sys.stdout.write(text)
    except OSError as e:
        _stdout_failed(e)


def _stdout_failed(e: OSError) -> NoReturn:
    raise stdout_error(e) from None


class StdoutClosed(OutputError):
    """The reader of stdout went away (`llamapro … | head`): no message, exit 141, as for a process that
    SIGPIPE ended (git, cat): the reader chose to stop, nothing went wrong on our side."""

    exit_code = 128 + 13  # SIGPIPE


def stdout_error(e: OSError) -> OutputError:
    """stdout is full, closed or gone: exit 4 with one line; what the command finished (an expand output
    folder) is kept. The descriptor is pointed at /dev/null, so the interpreter's last flush of what is
    still buffered cannot fail a second time (and print a traceback-like warning)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, sys.stdout.fileno())
        finally:
            os.close(null)
    if e.errno == errno.EPIPE:
        return StdoutClosed("stdout closed by its reader")
    reason = os.strerror(e.errno) if e.errno else str(e)
    return OutputError(
        f"cannot write to stdout: {reason}",
        hint="send stdout somewhere with room (a file, a pipe that reads it all); what the command "
        "wrote elsewhere is complete and kept",
    )


def to_jsonable(report: DataclassInstance) -> dict[str, Any]:
    """The `--json` document of a report: `schema_version` first, then `asdict(report)`."""
    return {"schema_version": JSON_SCHEMA_VERSION, **dataclasses.asdict(report)}


def json_default(value: object) -> object:
    """What `json.dumps` cannot encode by itself: enums by value, anything else as its text."""
    return value.value if isinstance(value, Enum) else str(value)


def print_json(report: DataclassInstance) -> None:
    # ensure_ascii: every control or non-ASCII character of the data is a \\u escape, never raw.
    _write(json.dumps(to_jsonable(report), indent=2, default=json_default, ensure_ascii=True) + "\n")


def print_rows(rows: Sequence[tuple[str, str]]) -> None:
    """A two-column table: keys (bold on a colour terminal) and values."""
    _print_table(None, rows)


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A table with a header line (shards, the layer plan)."""
    _print_table(header, rows)


def _print_table(header: Sequence[str] | None, rows: Sequence[Sequence[str]]) -> None:
    cells = [[clean(cell) for cell in row] for row in rows]
    if not stdout_is_terminal():
        _write("".join(line + "\n" for line in plain_table(header, cells)))
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(*(header or ()), show_header=header is not None, box=None, pad_edge=False)
    if header is None:
        table.add_column(style="bold")
        table.add_column()
    for row in cells:
        table.add_row(*(Text(cell) for cell in row))  # Text: the cell is never parsed as markup
    try:
        _console(sys.stdout).print(table)
    except OSError as e:
        _stdout_failed(e)


def plain_table(header: Sequence[str] | None, rows: Sequence[Sequence[str]]) -> list[str]:
    """The table for a pipe or a file: columns two spaces apart, no wrapping, no trailing spaces, no
    escape codes, so `grep`, `awk` and `diff` see every row whole whatever the terminal width."""
    from rich.cells import cell_len  # display width: a CJK character takes two columns

    lines = [list(header)] if header is not None else []
    lines += [list(row) for row in rows]
    if not lines:
        return []
    widths = [max(cell_len(line[i]) for line in lines) for i in range(len(lines[0]) - 1)]
    padded = ([c + " " * (w - cell_len(c)) for c, w in zip(line, widths, strict=False)] for line in lines)
    return ["  ".join([*cells, line[-1]]).rstrip() for cells, line in zip(padded, lines, strict=True)]


def stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False


def no_color() -> bool:
    """NO_COLOR set to anything but the empty string (no-color.org): no styling at all, bold included."""
    return bool(os.environ.get("NO_COLOR"))


def _console(file: TextIO) -> Console:
    from rich.console import Console  # imported on first use: `llamapro --help` never needs rich

    # color_system=None renders no escape code at all; rich's own NO_COLOR support keeps bold.
    return Console(file=file, highlight=False, soft_wrap=True, color_system=None if no_color() else "auto")


# --- the formats the tables share -----------------------------------------------------------------------


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def layer_ranges(indices: Sequence[int]) -> str:
    """[0,1,2,5,7,8] -> '0-2, 5, 7-8'."""
    parts: list[str] = []
    run: list[int] = []
    for i in indices:
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            parts.append(_run(run))
        run = [i]
    if run:
        parts.append(_run(run))
    return ", ".join(parts) if parts else "-"


def _run(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"


def new_layer_pairs(new_layers: Sequence[int], sources: Sequence[int]) -> str:
    """'4<-3, 9<-7': each new layer with the original layer it copies."""
    return ", ".join(f"{j}<-{s}" for j, s in zip(new_layers, sources, strict=True))


# --- progress -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def progress(label: str, *, quiet: bool) -> Iterator[Progress]:
    """A (done, total) callback: a rich bar on a terminal, plain lines every ~10 s otherwise."""
    if quiet:
        yield lambda done, total: None
        return
    if sys.stderr.isatty():
        with _rich_bar(label) as update:
            yield update
        return
    yield _periodic_lines(label)


@contextlib.contextmanager
def _rich_bar(label: str) -> Iterator[Progress]:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.progress import Progress as Bar

    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Bar(*columns, console=_console(sys.stderr), transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _interval() -> float:
    """Seconds between plain progress lines: `LLAMAPRO_PROGRESS_INTERVAL` (a test hook), else 10."""
    try:
        return max(0.0, float(os.environ.get("LLAMAPRO_PROGRESS_INTERVAL") or PROGRESS_INTERVAL_S))
    except ValueError:
        return PROGRESS_INTERVAL_S


def _periodic_lines(label: str) -> Progress:
    start = time.monotonic()
    last = [start]
    interval = _interval()

    def update(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= interval or (done >= total and now - start >= interval):
            last[0] = now
            pct = 100.0 * done / total if total else 100.0
            note(f"{label}: {human_bytes(done)} of {human_bytes(total)} ({pct:.0f}%), {now - start:.0f} s")

    return update
