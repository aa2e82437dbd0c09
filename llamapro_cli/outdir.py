"""The output folder's safety rules: disjoint paths, a lock, a temporary sibling, an atomic rename.

`atomic_output(out)` yields a fresh `<out>.partial-<random>` folder beside `out` (with a marker file
naming the pid and start time) and, when the body completes, fsyncs it and renames it to `out`. On any
exception, SIGINT or SIGTERM the temporary folder is removed and the error re-raised (signals become
`Interrupted`, exit 130/143). An existing `out` is refused unless `force`, and `force` only replaces an
empty folder or a previous llamapro output: the old one is renamed aside, the new one renamed in, then
the old one deleted. A lock beside `out` makes concurrent runs to the same `out` fail cleanly.

Invariant: nothing named `out` ever exists in a half-written state. Must not: touch the input.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from .errors import Interrupted, OutputError, UsageError

MARKER = ".llamapro-partial"
PROVENANCE = "llamapro.json"
MARGIN = 16 * 1024 * 1024  # headers, config, index, carried files


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


def is_llamapro_output(path: Path) -> bool:
    return (path / PROVENANCE).is_file()


@contextlib.contextmanager
def atomic_output(out: Path, *, force: bool, need_bytes: int) -> Iterator[Path]:
    """Yield a temporary folder that becomes `out` when the body completes without error."""
    parent = out.parent
    if not parent.is_dir():
        raise OutputError(f"cannot create {out}: {parent} does not exist")
    with _lock(out):
        _check_existing(out, force=force)
        _check_space(out, need_bytes)
        tmp = parent / f"{out.name}.partial-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
        except OSError as e:
            raise OutputError(f"cannot create {tmp}: {os.strerror(e.errno or 0)}") from e
        try:
            with _signals_raise():
                (tmp / MARKER).write_text(json.dumps({"pid": os.getpid(), "started": time.time()}))
                yield tmp
                (tmp / MARKER).unlink()
                _fsync_dir(tmp)
                _replace(tmp, out, force=force)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _check_existing(out: Path, *, force: bool) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder")
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
        raise OutputError(f"cannot rename {tmp} to {out}: {os.strerror(e.errno or 0)}") from e
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """An exclusive flock on `.<out>.llamapro-lock`, removed on release (inode re-checked on acquire)."""
    path = out.parent / f".{out.name}.llamapro-lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"cannot create {path}: {os.strerror(e.errno or 0)}") from e
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


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """Turn SIGINT/SIGTERM into `Interrupted` so cleanup runs; a no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
