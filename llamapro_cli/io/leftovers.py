"""Leftovers of killed runs: `<out>.partial-*` folders that a SIGKILL, an OOM kill or a power loss left.

`sweep_partials(out, notes)` runs under the output's lock before a new run starts: a folder whose marker
names a process that is gone (or a zombie, or a newer process reusing the pid) is removed; one whose
process still runs is left and reported; one without a marker is removed only when empty. Folders of
other `--out` names, and names not of the form `<out>.partial-<8 hex>`, are never touched.

Invariant: only folders named `<out>.partial-<8 hex>` are ever removed, and a marker is read without
following a link or blocking on a FIFO, a few KiB at most. Must not: touch `out` itself or the input.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import re
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

MARKER = ".llamapro-partial"
PARTIAL_NAME = re.compile(r"^.+\.partial-[0-9a-f]{8}$")
# A pid is reused when its process started after the marker was written; /proc start times have
# a one-second resolution (boot time in whole seconds), so allow some slack.
_START_SLACK_S = 2.0

Notes = Callable[[str], None]


def sweep_partials(out: Path, notes: Notes) -> None:
    """Remove `<out>.partial-*` folders whose run is gone; report the others. Runs under the lock."""
    pattern = glob.escape(out.name) + ".partial-*"
    for tmp in sorted(out.parent.glob(pattern)):
        if not PARTIAL_NAME.match(tmp.name) or tmp.is_symlink() or not tmp.is_dir():
            continue
        owner = _marker_owner(tmp, out.name)
        if owner is None:
            if _empty(tmp):  # killed between mkdir and the marker: nothing to lose
                with contextlib.suppress(OSError):
                    tmp.rmdir()
                notes(f"removed {tmp}, an empty temporary folder left by an interrupted run")
            else:
                notes(f"{tmp} has no llamapro marker; left in place (delete it if it is not needed)")
        elif _running(*owner):
            notes(
                f"{tmp} belongs to process {owner[0]}, which is still running; left in place "
                "(if no llamapro run is writing it, delete it)"
            )
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            notes(f"removed {tmp}, left by an interrupted run (its process {owner[0]} no longer runs)")


def _empty(folder: Path) -> bool:
    try:
        return not any(folder.iterdir())
    except OSError:  # not ours to list (another user's): not ours to remove either
        return False


def _marker_owner(tmp: Path, out_name: str) -> tuple[int, float] | None:
    """(pid, start time) from a temporary folder's marker; None when absent or not ours."""
    try:  # never follow a link or block on a FIFO; a marker is a few dozen bytes
        fd = os.open(tmp / MARKER, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            marker = json.loads(os.read(fd, 4096)) if stat.S_ISREG(os.fstat(fd).st_mode) else None
        finally:
            os.close(fd)
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(marker, dict):
        return None
    pid, started = marker.get("pid"), marker.get("started")
    # A pid fits a C int (Linux: at most 2**22); a start time is a finite float. Anything else is no
    # marker of ours (and would overflow os.kill or float()).
    if type(pid) is not int or not 0 < pid < 2**31 or not isinstance(started, int | float):
        return None
    try:
        when = float(started)  # an int past float's range overflows
    except OverflowError:
        return None
    if not math.isfinite(when):
        return None
    if marker.get("out", out_name) != out_name:  # a marker copied from another run's folder
        return None
    return pid, when


def _running(pid: int, started: float) -> bool:
    """Whether the process that wrote a marker at `started` still runs (pid alive, not a zombie,
    and not a newer process that reuses the pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    stat = _proc_stat(pid)
    if stat is None:  # no /proc (macOS): a live pid is all we know; stay on the safe side
        return True
    state, start = stat
    return state not in ("Z", "X") and start <= started + _START_SLACK_S


def _proc_stat(pid: int) -> tuple[str, float] | None:
    """(state letter, start time as a Unix time) from /proc, or None where /proc is unavailable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
