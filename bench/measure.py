"""Fair timing of one command: cold page cache, the final flush counted, peak RSS of the process tree.

Each run: the previous output is deleted and flushed, the page cache is dropped (`echo 3 >
/proc/sys/vm/drop_caches`; where that is not permitted, `posix_fadvise(DONTNEED)` on every input file),
then `bash -c 'COMMAND && sync'` runs under GNU `/usr/bin/time`, whose rusage gives the peak RSS of
the largest process in the tree (the kernel folds a waited-for child's peak into its parent's) and the
CPU time of the whole tree. Wall time is measured around the whole command, `sync` included. On a
benchmark filesystem (`--fs`), the new space a run allocated is the settled free space before it minus
after it, and `du` of its output is recorded beside it (shared blocks count in full there).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import fsimage


@dataclass(frozen=True)
class Sample:
    wall: float
    user: float
    system: float
    peak_rss: int  # bytes
    load: float  # 1-minute load average when the run started
    ok: bool
    log: str = ""
    allocated: int = -1  # new space on the filesystem (settled free bytes before - after); -1: not taken
    du: int = -1  # `du -sB1` of the output (shared blocks count in full); -1: not taken


@dataclass
class Series:
    tool: str
    size: str
    bytes_written: int = 0  # logical size of the output (holes included)
    samples: list[Sample] = field(default_factory=list)
    correct: str = ""
    note: str = ""

    def walls(self) -> list[float]:
        return [s.wall for s in self.samples if s.ok]

    @property
    def median(self) -> float:
        return statistics.median(self.walls()) if self.walls() else float("nan")

    @property
    def peak_rss(self) -> int:
        return max((s.peak_rss for s in self.samples if s.ok), default=0)


def drop_caches(inputs: list[Path]) -> str:
    """Empty the page cache; returns how ("drop_caches" or "fadvise")."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for path in inputs:
            for f in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        return "fadvise"


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    os.sync()


def logical_size(path: Path) -> int:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(f.stat().st_size for f in files)


def run(
    command: str,
    *,
    inputs: list[Path],
    out: Path,
    env: dict[str, str] | None = None,
    space: bool = False,
) -> Sample:
    """Time `command && sync` cold; `out` is removed before (not after: the caller checks it first).
    `space`: also the new space it allocated on `out`'s filesystem, and `du` of `out`."""
    remove(out)
    free_before = fsimage.settled_free(out.parent) if space else 0
    drop_caches(inputs)
    time.sleep(1.0)  # let the discards of the deletion and the cache drop settle
    load = os.getloadavg()[0]
    # /usr/bin/time forks the command from a small process: a child forked straight from this Python
    # process would report this process's own peak as its floor (Linux carries the peak RSS across exec).
    stats = out.parent / ".time-stats"
    started = time.perf_counter()
    done = subprocess.run(
        ["/usr/bin/time", "-o", str(stats), "-f", "%M %U %S", "bash", "-c", f"{command} && sync"],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wall = time.perf_counter() - started
    fields = stats.read_text().split()[-3:]
    stats.unlink()
    return Sample(
        wall=wall,
        user=float(fields[1]),
        system=float(fields[2]),
        peak_rss=int(fields[0]) * 1024,
        load=load,
        ok=done.returncode == 0,
        log=done.stdout[-2000:] if done.returncode else "",  # kept only to explain a failure
        allocated=free_before - fsimage.settled_free(out.parent) if space else -1,
        du=fsimage.du(out) if space and out.exists() else -1,
    )


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def skip_reason(tool: str, input_bytes: int, mergekit_note: str, root: Path) -> str:
    """Why `tool` cannot run now (memory, disk), or ''; mergekit needs about half its input in memory and
    every output needs ~1.5 x the input of free disk."""
    if tool == "mergekit" and mergekit_note:
        return mergekit_note
    if tool == "mergekit" and mem_available() < input_bytes // 2 + (2 << 30):
        return (
            f"skipped: {mem_available() >> 30} GiB of memory available, mergekit needs about half the input"
        )
    if tool != "read" and free_bytes(root) < input_bytes * 3 // 2 + (2 << 30):
        return f"skipped: {free_bytes(root) >> 30} GiB of free disk, the output needs ~1.5 x the input"
    return ""


def quick_timings(command: list[str], repeat: int = 5) -> list[float]:
    """Warm wall times of a short command (one unmeasured warm-up run first)."""
    subprocess.run(command, capture_output=True, check=True)
    walls = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        walls.append(time.perf_counter() - started)
    return walls
