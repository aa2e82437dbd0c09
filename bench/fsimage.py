"""A loop-mounted filesystem image for `bench/run.py --fs xfs|btrfs|ext4`.

The image is a sparse file under bench/.work (only what the filesystem writes takes host disk),
formatted as asked (`mkfs.xfs -m reflink=1`: XFS with shared extents, the RHEL default since
xfsprogs 5.1; `mkfs.btrfs`; `mkfs.ext4`, which cannot clone, as the control) and loop-mounted for the
run; the mkfs tool is installed with apt where it is missing. Needs root. Also: the free bytes of a
filesystem once deferred frees have settled, so that "new space allocated" is a difference of two
settled readings.

Must not: touch anything outside bench/.work.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

MKFS = {
    "xfs": (["mkfs.xfs", "-q", "-f", "-m", "reflink=1"], "xfsprogs"),
    "btrfs": (["mkfs.btrfs", "-q", "-f"], "btrfs-progs"),
    "ext4": (["mkfs.ext4", "-q", "-F"], "e2fsprogs"),
}
_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PATH": _PATH})


def _ensure_tool(fs: str) -> None:
    tool, package = MKFS[fs][0][0], MKFS[fs][1]
    if shutil.which(tool, path=_PATH):
        return
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]):
        done = _run(cmd)
        if done.returncode:
            raise SystemExit(f"bench: {tool} is missing and `{' '.join(cmd)}` failed: {done.stderr[-300:]}")


@contextlib.contextmanager
def mounted(fs: str, work: Path, size: int) -> Iterator[Path]:
    """Yield the mount point of a fresh `fs` image of `size` bytes (sparse); unmounted afterwards."""
    if os.geteuid() != 0:
        raise SystemExit("bench --fs needs root (mkfs, mount -o loop, drop_caches)")
    _ensure_tool(fs)
    image, mount = work / f"fs-{fs}.img", work / f"mnt-{fs}"
    if _run(["mountpoint", "-q", str(mount)]).returncode == 0:
        _run(["umount", str(mount)])
    mount.mkdir(parents=True, exist_ok=True)
    with image.open("wb") as f:
        f.truncate(size)
    for cmd in ([*MKFS[fs][0], str(image)], ["mount", "-o", "loop", str(image), str(mount)]):
        done = _run(cmd)
        if done.returncode:
            raise SystemExit(f"bench: `{' '.join(cmd)}` failed: {done.stderr.strip()[-300:]}")
    try:
        yield mount
    finally:
        os.sync()
        if _run(["umount", str(mount)]).returncode:
            _run(["umount", "-l", str(mount)])
        image.unlink()


def settled_free(path: Path, timeout: float = 20.0) -> int:
    """Free bytes of the filesystem holding `path`, read until two readings 0.5 s apart agree (XFS
    and btrfs free the blocks of a deleted file in the background)."""
    os.sync()
    last, deadline = shutil.disk_usage(path).free, time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        os.sync()
        now = shutil.disk_usage(path).free
        if now == last:
            return now
        last = now
    return last


def du(path: Path) -> int:
    """Bytes allocated to the files under `path` (`du -sB1`: shared blocks count in full)."""
    done = _run(["du", "-sB1", str(path)])
    return int(done.stdout.split()[0]) if done.returncode == 0 and done.stdout else 0
