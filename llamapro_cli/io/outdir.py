"""The output folder's safety rules: disjoint paths, a lock, a temporary sibling, an atomic rename.

`atomic_output(out)` yields a fresh `<out>.partial-<8 hex>` folder beside `out` (with a marker file
`.llamapro-partial` naming the pid and start time) and, when the body completes, fsyncs it and renames it
to `out`. On any exception, SIGINT or SIGTERM the temporary folder is removed and the error re-raised
(signals become `Interrupted`, exit 130/143); the final renames and the cleanup hold signals until they
are done, so they are never cut in half. An existing `out` is refused unless `force`, and `force` only
replaces an empty folder or a previous llamapro output: the old one is renamed aside, the new one renamed
in, then the old one deleted. A lock beside `out` makes concurrent runs to the same `out` fail cleanly.
Temporary folders of the same `out` left by a killed run (SIGKILL, power loss) are found under the lock:
removed when their process is gone, left in place and reported when it still runs.

Invariant: nothing named `out` ever exists in a half-written state. Must not: touch the input, print
(notes go to the caller's `notes` callback).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import re
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from llamapro_cli.errors import Interrupted, OutputError, UsageError

MARKER = ".llamapro-partial"
PROVENANCE = "llamapro.json"
MARGIN = 16 * 1024 * 1024  # headers, config, index, carried files
PARTIAL_NAME = re.compile(r"^.+\.partial-[0-9a-f]{8}$")
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# A pid is reused when its process started after the marker was written; /proc start times have
# a one-second resolution (boot time in whole seconds), so allow some slack.
_START_SLACK_S = 2.0

Notes = Callable[[str], None]


def check_disjoint(source: Path, out: Path) -> None:
    """Input and output, resolved, may not be equal or contain one another (either way)."""
    src = source.resolve()
    dst = out.resolve()
    if src == dst or src.is_relative_to(dst) or dst.is_relative_to(src):
        raise UsageError(
            f"--out {out} and the input {source} overlap; the output may not contain the input or lie in it"
        )


def free_space(out: Path) -> int:
    """Free bytes on the filesystem that will hold `out` (its nearest existing ancestor)."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def is_partial(path: Path) -> bool:
    """A temporary folder of an unfinished run: named `<out>.partial-<8 hex>` or holding the marker."""
    return bool(PARTIAL_NAME.match(path.name)) or (path / MARKER).exists()


def is_llamapro_output(path: Path) -> bool:
    return (path / PROVENANCE).is_file() and not is_partial(path)


@contextlib.contextmanager
def atomic_output(out: Path, *, force: bool, need_bytes: int, notes: Notes | None = None) -> Iterator[Path]:
    """Yield a temporary folder that becomes `out` when the body completes without error."""
    parent = out.parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise OutputError(f"cannot create {out}: {parent} {what}")
    with _lock(out):
        _sweep_partials(out, notes or (lambda _: None))
        _check_existing(out, force=force)
        _check_space(out, need_bytes)
        tmp = parent / f"{out.name}.partial-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
        except OSError as e:
            raise OutputError(f"cannot create {tmp}: {_strerror(e)}") from e
        try:
            with _signals_raise():
                _write_marker(tmp)
                yield tmp
            with _signals_held():
                (tmp / MARKER).unlink()
                _fsync_files(tmp)
                _fsync_dir(tmp)
                _replace(tmp, out, force=force)
        except BaseException:
            with _signals_held():
                shutil.rmtree(tmp, ignore_errors=True)
            raise


def _write_marker(tmp: Path) -> None:
    marker = {"pid": os.getpid(), "started": time.time(), "out": tmp.name.rsplit(".partial-", 1)[0]}
    try:
        (tmp / MARKER).write_text(json.dumps(marker) + "\n")
    except OSError as e:
        raise OutputError(f"cannot write {tmp / MARKER}: {_strerror(e)}") from e


def _check_existing(out: Path, *, force: bool) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        kind = "a symbolic link" if out.is_symlink() else "not a folder"
        raise OutputError(f"--out {out} exists and is {kind}", hint="choose another --out")
    if not force:
        raise OutputError(f"--out {out} already exists", hint="choose another --out, or pass --force")
    if any(out.iterdir()) and not is_llamapro_output(out):
        raise OutputError(
            f"--out {out} is not empty and not a llamapro output; --force replaces only those",
            hint="remove it yourself if you mean it",
        )


def _check_space(out: Path, need: int) -> None:
    free = free_space(out)
    if free < need + MARGIN:
        raise OutputError(
            f"not enough free space for {out}: need {_gb(need + MARGIN)}, {_gb(free)} free",
            hint="free some space or choose another --out",
        )


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _strerror(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


def _replace(tmp: Path, out: Path, *, force: bool) -> None:
    old: Path | None = None
    if out.exists() and force:
        old = out.parent / f"{out.name}.old-{secrets.token_hex(4)}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError as e:
        if old is not None:
            os.rename(old, out)
        raise OutputError(f"cannot rename {tmp} to {out}: {_strerror(e)}") from e
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_files(folder: Path) -> None:
    """Flush every file of the finished folder, so the rename never publishes empty files after a crash
    (shards are flushed by their writer already; this catches the small files copied beside them)."""
    for path in folder.iterdir():
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- leftovers of killed runs ---------------------------------------------------------------------------


def _sweep_partials(out: Path, notes: Notes) -> None:
    """Remove `<out>.partial-*` folders whose run is gone; report the others. Runs under the lock."""
    pattern = glob.escape(out.name) + ".partial-*"
    for tmp in sorted(out.parent.glob(pattern)):
        if not PARTIAL_NAME.match(tmp.name) or tmp.is_symlink() or not tmp.is_dir():
            continue
        owner = _marker_owner(tmp, out.name)
        if owner is None:
            if not any(tmp.iterdir()):  # killed between mkdir and the marker: nothing to lose
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


def _marker_owner(tmp: Path, out_name: str) -> tuple[int, float] | None:
    """(pid, start time) from a temporary folder's marker; None when absent or not ours."""
    try:
        marker = json.loads((tmp / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict):
        return None
    pid, started = marker.get("pid"), marker.get("started")
    if type(pid) is not int or pid <= 0 or not isinstance(started, int | float):
        return None
    if marker.get("out", out_name) != out_name:  # a marker copied from another run's folder
        return None
    return pid, float(started)


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


# --- lock and signals -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """An exclusive flock on `.<out>.llamapro-lock`, removed on release (inode re-checked on acquire)."""
    path = out.parent / f".{out.name}.llamapro-lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise OutputError(
                f"cannot create {out}: cannot write in {out.parent} ({_strerror(e)})",
                hint="choose an --out in a folder you can write to",
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(fd)
            raise OutputError(f"another llamapro run is writing {out}", hint="wait for it to finish") from e
        # The previous holder may have unlinked the file between our open and our flock: retry.
        if _same_file(fd, path):
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _main_thread() -> bool:
    # Python runs signal handlers in the main thread only, and only it may install them.
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """Turn SIGINT/SIGTERM into `Interrupted` so cleanup runs; a no-op outside the main thread."""
    if not _main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Record SIGINT/SIGTERM instead of raising while a step must not be cut in half (the final renames,
    the cleanup); raise `Interrupted` for the first one afterwards."""
    if not _main_thread():
        yield
        return
    pending: list[int] = []

    def record(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    previous = {s: signal.signal(s, record) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if pending:
        raise Interrupted(pending[0])
