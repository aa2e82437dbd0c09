"""The input files of one run: each opened once, and proven to be the file whose header was read.

`read_header()` records a `FileStamp` (device, inode, size, mtime in ns) of the file it read, from the
same open file. `SourceFiles` opens each source once per run and refuses one whose stamp differs
(replaced by `os.replace`, rewritten, truncated or grown between the header read and the copy); every
engine reads through these descriptors, so a file swapped in later is never read at the old header's
offsets. `verify()`, called after each output shard, re-checks every open source — its size and mtime
through the descriptor, and that its path still names the same file — so a change during the copy stops
the run (exit 3) before anything is published.

Invariant: a source is opened read-only, at most once per run (plus one `O_DIRECT` descriptor of the same
file); every descriptor is closed by `close()`. Must not: import anything of the package above `errors`
and `io.files`; write anything.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from llamapro_cli.errors import InputError
from llamapro_cli.io.files import os_message

_CHANGED_HINT = "rerun once nothing else writes to the input folder"


@dataclass(frozen=True)
class FileStamp:
    """What identifies one version of a file: a replaced, rewritten or resized file has another stamp."""

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStamp:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def changed(path: Path, what: str) -> InputError:
    return InputError(f"{path} changed while llamapro was reading it ({what})", hint=_CHANGED_HINT)


class SourceFiles:
    """Open source files by path, each once; with `stamps`, only the very files those stamps describe."""

    def __init__(self, stamps: dict[Path, FileStamp] | None = None) -> None:
        self.stamps = dict(stamps or {})
        self.fds: dict[Path, int] = {}
        self.direct: dict[Path, int] = {}  # -1: this file refuses O_DIRECT

    def __enter__(self) -> SourceFiles:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def open_all(self) -> None:
        """Open every stamped source now, so a later swap of its path cannot reach the copy."""
        for path in self.stamps:
            self.fd(path)

    def fd(self, path: Path) -> int:
        """The run's read-only descriptor of `path`, opened on first use and checked against its stamp."""
        if path not in self.fds:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise InputError(f"cannot read {path}: {os_message(e)}") from e
            self.fds[path] = fd
            stamp = self.stamps.get(path)
            if stamp is not None and FileStamp.of(os.fstat(fd)) != stamp:
                raise changed(path, "it is not the file whose header was read")
        return self.fds[path]

    def size(self, path: Path) -> int:
        stamp = self.stamps.get(path)
        return stamp.size if stamp is not None else os.fstat(self.fd(path)).st_size

    def direct_fd(self, path: Path) -> int:
        """An `O_DIRECT` descriptor of the same file as `fd(path)`; -1 where the OS or filesystem refuses."""
        if path not in self.direct:
            main = os.fstat(self.fd(path))
            fd = -1
            with contextlib.suppress(OSError, AttributeError):  # no O_DIRECT here: buffered reads
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
            self.direct[path] = fd
            if fd >= 0 and (os.fstat(fd).st_dev, os.fstat(fd).st_ino) != (main.st_dev, main.st_ino):
                raise changed(path, "replaced by another file")
        return self.direct[path]

    def refuse_direct(self, path: Path) -> None:
        """This file (or a range of it) refuses O_DIRECT: read it buffered from now on."""
        fd = self.direct.get(path, -1)
        if fd >= 0:
            os.close(fd)
        self.direct[path] = -1

    def verify(self) -> None:
        """Every open source is still the file it was: same size and mtime, and its path names it."""
        for path, fd in self.fds.items():
            now = os.fstat(fd)
            then = self.stamps.get(path)
            if then is not None and (now.st_size, now.st_mtime_ns) != (then.size, then.mtime_ns):
                raise changed(path, "rewritten or resized during the copy")
            try:
                named = os.stat(path)
            except OSError as e:
                raise changed(path, f"its path no longer opens: {os_message(e)}") from e
            if (named.st_dev, named.st_ino) != (now.st_dev, now.st_ino):
                raise changed(path, "replaced by another file during the copy")

    def close(self) -> None:
        for fd in [*self.fds.values(), *self.direct.values()]:
            if fd >= 0:
                os.close(fd)
        self.fds.clear()
        self.direct.clear()
