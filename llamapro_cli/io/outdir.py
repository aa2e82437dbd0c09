"""The output folder's safety rules: disjoint paths, a lock, a temporary sibling, an atomic rename.

`atomic_output(out)` yields a fresh `<out>.partial-<8 hex>` folder beside `out` (with a marker file
`.llamapro-partial` naming the pid and start time) and, when the body completes, fsyncs it and renames it
to `out`, with `.llamapro-files.json` (`io.manifest`) listing every file it wrote. On any exception,
SIGINT, SIGTERM or SIGHUP the temporary folder is removed and the error re-raised (signals become
`Interrupted`, exit 130/143/129); the final renames and the cleanup hold signals until they are done, so
they are never cut in half. An existing `out` is refused unless `force`, and `force` only replaces an
empty folder or a previous output that holds exactly what its record lists: the old one is renamed aside,
the new one renamed in, then the old one's recorded files deleted. A lock beside `out` (never followed if
it is a link) makes concurrent runs to the same `out` fail cleanly. Temporary folders of the same `out`
left by a killed run (SIGKILL, power loss) are found under the lock: removed when their process is gone,
left in place and reported when it still runs. `check_disjoint` keeps every input file, links resolved,
away from all of these paths.

Invariant: nothing named `out` ever exists in a half-written state; nothing is deleted that a run did
not write. Must not: touch the input, print (notes go to the caller's `notes` callback).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import signal
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from llamapro_cli.errors import InputError, Interrupted, OutputError, UsageError
from llamapro_cli.io.leftovers import MARKER, PARTIAL_NAME, Notes, sweep_partials
from llamapro_cli.io.manifest import MANIFEST, first_foreign, remove_owned, write_manifest

MARGIN = 16 * 1024 * 1024  # headers, config, index, carried files
# A closed terminal (SIGHUP) is an interruption like Ctrl-C or `kill`: clean up, exit 128 + signal.
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
SKIP_SPACE_CHECK = "LLAMAPRO_SKIP_SPACE_CHECK"  # "1": do not compare the free space with the need


def check_disjoint(source: Path, out: Path) -> None:
    """Refuse an `out` the run must not write (exit 2): one named like a temporary folder, or one whose
    paths overlap the input — the folder itself, or any file in it, links resolved — either way. The
    paths a run writes, renames or deletes are `out` and, beside it, `<out>.partial-*`, `<out>.old-*`
    and the lock: no input file may resolve into them (a folder of links into a previous output is an
    input that `--force` would otherwise delete)."""
    if PARTIAL_NAME.match(out.name):
        raise UsageError(
            f"--out {out} is named like the temporary folder of an unfinished run (*.partial-<8 hex>)",
            hint="choose another --out name",
        )
    try:
        src, dst = source.resolve(), out.resolve()
    except (OSError, RuntimeError) as e:  # a link loop (3.11 raises RuntimeError for one)
        raise OutputError(f"--out {out} is a link that never ends ({e})", hint="choose another --out") from e
    if src == dst or src.is_relative_to(dst) or dst.is_relative_to(src):
        raise UsageError(
            f"--out {out} and the input {source} overlap; the output may not contain the input or lie in it"
        )
    for path in _entries(source):
        try:
            target = path.resolve()
        except (OSError, RuntimeError):  # a link loop leads nowhere (reading it fails on its own)
            continue
        if _written_by_run(target, dst):
            raise UsageError(
                f"--out {out} and the input overlap: {path} resolves to {target}, which this run "
                "would replace or delete"
            )


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError:  # unreadable: reading the checkpoint reports it
        return []


def _written_by_run(target: Path, out: Path) -> bool:
    if not target.is_relative_to(out.parent):
        return False
    top = target.relative_to(out.parent).parts
    if not top:
        return False
    name = top[0]
    return name == out.name or name.startswith((f"{out.name}.partial-", f"{out.name}.old-", f".{out.name}."))


def free_space(out: Path) -> int | None:
    """Free bytes on the filesystem that will hold `out` (its nearest ancestor we can stat); None when
    the filesystem reports no capacity at all (ramfs, some FUSE and network filesystems): unknown, not 0."""
    probe = out
    while True:
        try:
            st = os.statvfs(probe)
            break
        except (FileNotFoundError, NotADirectoryError, PermissionError):  # not there, or not searchable
            if probe == probe.parent:
                return None
            probe = probe.parent
        except OSError:
            return None
    if st.f_blocks == 0:
        return None
    return st.f_bavail * st.f_frsize


def is_partial(path: Path) -> bool:
    """A temporary folder of an unfinished run: named `<out>.partial-<8 hex>` or holding the marker."""
    if PARTIAL_NAME.match(path.name):
        return True
    try:
        os.lstat(path / MARKER)
    except FileNotFoundError:
        return False
    except OSError as e:  # e.g. a folder we may not search: say so, never a bare PermissionError
        raise InputError(f"cannot read {path}: {_strerror(e)}") from e
    return True


@contextlib.contextmanager
def atomic_output(out: Path, *, force: bool, need_bytes: int, notes: Notes | None = None) -> Iterator[Path]:
    """Yield a temporary folder that becomes `out` when the body completes without error."""
    parent = out.parent
    try:
        is_dir = stat.S_ISDIR(os.stat(parent).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        raise OutputError(f"cannot create {out}: {parent} does not exist") from None
    except OSError as e:  # e.g. a folder above it we may not search
        raise OutputError(f"cannot create {out}: cannot reach {parent} ({_strerror(e)})") from e
    if not is_dir:
        raise OutputError(f"cannot create {out}: {parent} is not a folder")
    with _lock(out):
        sweep_partials(out, notes or (lambda _: None))
        _check_existing(out, force=force)
        _check_space(out, need_bytes)
        note = notes or (lambda _: None)
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
                _record(tmp)
                _fsync_dir(tmp)
                _replace(tmp, out, force=force, notes=note)
        except BaseException:
            with _signals_held():
                shutil.rmtree(tmp, ignore_errors=True)
            raise


def _write_marker(tmp: Path) -> None:
    marker = {"pid": os.getpid(), "started": time.time(), "out": tmp.name.rsplit(".partial-", 1)[0]}
    try:
        fd = os.open(tmp / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, (json.dumps(marker) + "\n").encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise OutputError(f"cannot write {tmp / MARKER}: {_strerror(e)}") from e


def _record(tmp: Path) -> None:
    try:
        write_manifest(tmp)
    except OSError as e:
        raise OutputError(f"cannot write {tmp / MANIFEST}: {_strerror(e)}") from e


def _check_existing(out: Path, *, force: bool) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        kind = "a symbolic link" if out.is_symlink() else "not a folder"
        raise OutputError(f"--out {out} exists and is {kind}", hint="choose another --out")
    if not force:
        raise OutputError(f"--out {out} already exists", hint="choose another --out, or pass --force")
    _refuse_foreign(out)


def _refuse_foreign(out: Path) -> None:
    """`--force` replaces only an empty folder or exactly what a previous expand wrote (its record)."""
    try:
        foreign = first_foreign(out)
    except OSError as e:
        raise OutputError(f"cannot read --out {out}: {_strerror(e)}") from e
    if foreign is not None:
        path, why = foreign
        raise OutputError(
            f"--out {out} is not a llamapro output: {path} {why}; --force replaces only what expand wrote",
            hint="remove it yourself if you mean it, or choose another --out",
        )


def _check_space(out: Path, need: int) -> None:
    free = free_space(out)
    if free is None or os.environ.get(SKIP_SPACE_CHECK) == "1":  # unknown capacity, or asked not to
        return
    if free < need + MARGIN:
        raise OutputError(
            f"not enough free space for {out}: need {_gb(need + MARGIN)}, {_gb(free)} free",
            hint=f"free some space or choose another --out ({SKIP_SPACE_CHECK}=1 skips this check)",
        )


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _strerror(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


def _replace(tmp: Path, out: Path, *, force: bool, notes: Notes) -> None:
    old: Path | None = None
    if out.exists() and force:
        _refuse_foreign(out)  # again, under the lock: a trainer may have written into it meanwhile
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
        left = remove_owned(old)
        if left is not None:
            notes(f"left {old} in place (the previous output): {left[0]} {left[1]}; delete it yourself")


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


# --- lock and signals -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """An exclusive flock on `.<out>.llamapro-lock`, removed on release (inode re-checked on acquire).
    A link there is refused, never followed: following it would create or truncate any file as us."""
    path = out.parent / f".{out.name}.llamapro-lock"
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    while True:
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise OutputError(
                    f"cannot create {out}: the lock file {path} is a symbolic link",
                    hint="remove the link; llamapro never follows one there",
                ) from e
            raise OutputError(
                f"cannot create {out}: cannot write in {out.parent} ({_strerror(e)})",
                hint="choose an --out in a folder you can write to",
            ) from e
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OutputError(f"cannot create {out}: the lock file {path} is not a regular file")
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
    """Turn SIGINT/SIGTERM/SIGHUP into `Interrupted` so cleanup runs; a no-op outside the main thread."""
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
    """Record SIGINT/SIGTERM/SIGHUP instead of raising while a step must not be cut in half (the final
    renames, the cleanup); raise `Interrupted` for the first one afterwards."""
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
