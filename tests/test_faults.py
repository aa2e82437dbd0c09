"""Faults during `expand`, with a real `llamapro expand` subprocess: signals mid-copy, SIGKILL and the
next run, concurrent runs to one --out, a file-size limit, an unwritable target, --force rules, free space,
and overlapping input/output paths (symlinks included).

Copies are made slow and interruptible with the documented test hooks (`LLAMAPRO_COPY_CHUNK` bytes per
chunk, `LLAMAPRO_TEST_CHUNK_DELAY` seconds after each chunk), and a signal is sent only once the
temporary folder holds a shard being written, so every interruption lands mid-copy. After every failure:
the promised exit code, one `error:` line, no traceback, no output, no temporary or lock file, and the
input byte-for-byte unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llamapro_cli.cli.app import app
from llamapro_cli.io.leftovers import MARKER

# 4 layers -> 6 layers: a 9.8 MB output shard; 256 KiB chunks with 0.1 s pauses take about 4 s to copy.
SLOW = {"LLAMAPRO_COPY_CHUNK": str(256 * 1024), "LLAMAPRO_TEST_CHUNK_DELAY": "0.1"}


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
    }


def expand_cmd(src: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "llamapro_cli",
        "expand",
        "--every",
        "2",
        "--in",
        str(src),
        "--out",
        str(out),
        *extra,
    ]


def start(cmd: Sequence[str], *, env: dict[str, str] | None = None, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        list(cmd),
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,  # type: ignore[call-overload]
    )


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def wait_for(condition: Callable[[], object], what: str, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def copying(out: Path) -> Callable[[], bool]:
    """True once a `<out>.partial-*` folder holds its marker and a shard being written."""

    def check() -> bool:
        return any((p / MARKER).exists() and any(p.glob("*.safetensors")) for p in partials(out))

    return check


def partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(out.name + ".partial-*"))


def assert_one_error(stderr: str, *says: str) -> None:
    lines = stderr.splitlines()
    assert lines and lines[0].startswith("error: "), stderr
    assert len(lines) <= 2 and all(line.startswith("hint: ") for line in lines[1:]), stderr
    assert "Traceback" not in stderr
    for text in says:
        assert text in lines[0], (text, stderr)


def assert_no_leftovers(out: Path) -> None:
    assert not out.exists() and not out.is_symlink()
    assert partials(out) == []
    assert not (out.parent / f".{out.name}.llamapro-lock").exists()


def fake_statvfs(*, blocks: int, free: int) -> os.statvfs_result:
    """A filesystem of `blocks` 1 KB blocks with `free` of them available (the fields free_space reads)."""
    return os.statvfs_result((1000, 1000, blocks, free, free, 0, 0, 0, 0, 255))


def assert_complete(out: Path, layers: int = 6) -> None:
    result = CliRunner().invoke(app, ["inspect", "--json", str(out)])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["num_layers"] == layers
    assert partials(out) == [] and not list(out.parent.glob(out.name + ".old-*"))


# --- signals --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_copy_removes_the_temporary_folder(
    src: Path, tmp_path: Path, signum: int, code: int
) -> None:
    before, out = digest(src), tmp_path / "out"
    proc = start(expand_cmd(src, out), env=SLOW)
    wait_for(copying(out), "the copy to start")
    proc.send_signal(signum)
    rc, stdout, stderr = finish(proc)
    assert rc == code, stderr
    assert_one_error(stderr, f"interrupted by {signal.Signals(signum).name}")
    assert stdout == ""
    assert_no_leftovers(out)
    assert digest(src) == before


def test_sigkill_leaves_a_marked_partial_that_the_next_run_removes(src: Path, tmp_path: Path) -> None:
    before, out = digest(src), tmp_path / "out"
    started = time.time()
    proc = start(expand_cmd(src, out), env=SLOW)
    wait_for(copying(out), "the copy to start")
    proc.kill()
    proc.wait()  # reaped: the pid is gone, not a zombie
    assert not out.exists()
    [partial] = partials(out)
    marker = json.loads((partial / MARKER).read_text())
    assert marker["pid"] == proc.pid and started - 1 <= marker["started"] <= time.time()

    # Never mistaken for a finished output.
    inspect = CliRunner().invoke(app, ["inspect", str(partial)])
    assert inspect.exit_code == 3 and "unfinished llamapro expand" in inspect.stderr

    rc, _, stderr = finish(start(expand_cmd(src, out)))
    assert rc == 0, stderr
    assert f"removed {partial}" in stderr and f"process {proc.pid} no longer runs" in stderr
    assert_complete(out)
    assert digest(src) == before


def test_live_partials_are_left_and_reused_pids_are_not_live(src: Path, tmp_path: Path) -> None:
    # A real running llamapro process (writing another --out) owns one leftover; a second leftover
    # names the same pid but predates that process: the pid was reused, so that leftover is stale.
    writer = start(expand_cmd(src, tmp_path / "other"), env=SLOW)
    wait_for(copying(tmp_path / "other"), "the other run to start")
    marker = json.loads((partials(tmp_path / "other")[0] / MARKER).read_text())
    out = tmp_path / "out"
    live, reused = tmp_path / "out.partial-0000000a", tmp_path / "out.partial-0000000b"
    for folder, started in ((live, marker["started"]), (reused, marker["started"] - 3600)):
        folder.mkdir()
        (folder / MARKER).write_text(json.dumps({"pid": writer.pid, "started": started}))
        (folder / "model.safetensors").write_bytes(b"half")
    try:
        result = CliRunner().invoke(app, ["expand", "--every", "2", "--in", str(src), "--out", str(out)])
        assert result.exit_code == 0, result.stderr
        assert (
            f"{live} belongs to process {writer.pid}, which is still running; left in place" in result.stderr
        )
        assert f"removed {reused}" in result.stderr
        assert live.exists() and not reused.exists()
    finally:
        writer.terminate()
        assert finish(writer)[0] == 143
        shutil.rmtree(live)
    assert partials(tmp_path / "other") == []
    assert_complete(out)


def test_stale_partials_of_other_outputs_are_not_touched(src: Path, tmp_path: Path) -> None:
    # Only `<out>.partial-*` siblings with our marker are candidates; a similar name is someone else's.
    foreign = [
        tmp_path / "out2.partial-0000000c",
        tmp_path / "out.partial-notours",
        tmp_path / "out.partial-0000000d",
    ]
    for folder in foreign:
        folder.mkdir()
        (folder / "data").write_text("keep")
    # A marker that names another --out (copied from elsewhere) is not ours either, even with a dead pid.
    copied = tmp_path / "out.partial-0000000e"
    copied.mkdir()
    (copied / "data").write_text("keep")
    dead_pid = 2**22 + 1  # above Linux's largest pid_max: never a live process
    (copied / MARKER).write_text(json.dumps({"pid": dead_pid, "started": 0, "out": "elsewhere"}))
    foreign.append(copied)
    result = CliRunner().invoke(
        app, ["expand", "--every", "2", "--in", str(src), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.stderr
    assert all((folder / "data").read_text() == "keep" for folder in foreign)
    assert "out.partial-0000000d has no llamapro marker; left in place" in result.stderr


EXPAND_ARGS = ["expand", "--every", "2", "--in", "{src}", "--out", "{out}"]
OUTSIDE_THE_COPY = {
    "during-inspect": ("llamapro_cli.describe", "describe_checkpoint", ["inspect", "{src}"], signal.SIGINT),
    "before-the-copy": ("llamapro_cli.expand", "_prepare", EXPAND_ARGS, signal.SIGTERM),
    "after-the-copy": ("llamapro_cli.cli.output", "render_expand", EXPAND_ARGS, signal.SIGINT),
}


@pytest.mark.parametrize("when", list(OUTSIDE_THE_COPY))
def test_interrupts_outside_the_copy(src: Path, tmp_path: Path, when: str) -> None:
    # A real signal, sent by the process to itself on entering the hooked function, and handled by
    # the handlers `main()` installs (not Typer's "Aborted!", not a KeyboardInterrupt traceback).
    module, name, args, signum = OUTSIDE_THE_COPY[when]
    argv = [a.format(src=src, out=tmp_path / "out") for a in args]
    script = textwrap.dedent(
        f"""
        import importlib, os, sys
        module = importlib.import_module({module!r})
        real = getattr(module, {name!r})
        def hooked(*args, **kwargs):
            os.kill(os.getpid(), {int(signum)})
            return real(*args, **kwargs)
        setattr(module, {name!r}, hooked)
        from llamapro_cli.cli.app import main
        sys.argv = ["llamapro", *{argv!r}]
        main()
        """
    )
    rc, stdout, stderr = finish(start([sys.executable, "-c", script]))
    assert rc == 128 + signum, stderr
    assert_one_error(stderr, f"interrupted by {signal.Signals(signum).name}")
    assert stdout == ""
    if when == "after-the-copy":
        assert_complete(tmp_path / "out")  # the signal came after the rename: the output is whole
    else:
        assert_no_leftovers(tmp_path / "out")


# --- concurrency ----------------------------------------------------------------------------------------


def test_concurrent_runs_one_result_one_clean_failure(src: Path, tmp_path: Path) -> None:
    before, out = digest(src), tmp_path / "out"
    first = start(expand_cmd(src, out), env=SLOW)
    wait_for(copying(out), "the first run to start")
    rc, stdout, stderr = finish(start(expand_cmd(src, out)))
    assert rc == 4, stderr
    assert_one_error(stderr, f"another llamapro run is writing {out}")
    assert stdout == "" and not out.exists() and len(partials(out)) == 1  # only the first run's
    rc, _, stderr = finish(first)
    assert rc == 0, stderr
    assert_complete(out)
    assert not (tmp_path / ".out.llamapro-lock").exists()
    assert digest(src) == before


# --- write failures -------------------------------------------------------------------------------------


def test_file_size_limit_is_an_output_error(src: Path, tmp_path: Path) -> None:
    before, out = digest(src), tmp_path / "out"

    def limit() -> None:  # `ulimit -f 1024`: writes past 1 MiB fail with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    rc, stdout, stderr = finish(start(expand_cmd(src, out), preexec_fn=limit))
    assert rc == 4, stderr
    assert_one_error(stderr, "cannot write", "model.safetensors", "File too large")
    assert stdout == ""
    assert_no_leftovers(out)
    assert digest(src) == before


def test_unwritable_target_folder(src: Path, tmp_path: Path, unprivileged: list[str]) -> None:
    before, locked = digest(src), tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        rc, stdout, stderr = finish(start([*unprivileged, *expand_cmd(src, locked / "out")]))
    finally:
        locked.chmod(0o755)
    assert rc == 4, stderr
    assert_one_error(stderr, f"cannot create {locked / 'out'}", "Permission denied")
    assert stdout == "" and list(locked.iterdir()) == []
    assert digest(src) == before


@pytest.mark.parametrize("where", ["under-a-file", "in-proc", "missing-parent"])
def test_impossible_targets(src: Path, tmp_path: Path, where: str) -> None:
    (tmp_path / "file").write_text("x")
    out = {
        "under-a-file": tmp_path / "file" / "out",
        "in-proc": Path("/proc/llamapro-out"),
        "missing-parent": tmp_path / "no" / "out",
    }[where]
    result = CliRunner().invoke(app, ["expand", "--every", "2", "--in", str(src), "--out", str(out)])
    assert result.exit_code == 4, result.stderr
    assert_one_error(result.stderr, "cannot create")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "in"]


def test_not_enough_free_space(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = digest(src)
    monkeypatch.setattr(os, "statvfs", lambda path: fake_statvfs(blocks=10**9, free=10**3))
    result = CliRunner().invoke(
        app, ["expand", "--every", "2", "--in", str(src), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 4
    assert_one_error(result.stderr, "not enough free space", "0.00 GB free")
    assert_no_leftovers(tmp_path / "out")
    assert digest(src) == before


# --- --force and overlapping paths ----------------------------------------------------------------------


def test_force_onto_a_folder_that_is_not_ours(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("days of work")
    (out / "model.safetensors").write_bytes(b"not ours")
    before, mine = digest(src), digest(out)
    rc, _, stderr = finish(start(expand_cmd(src, out, "--force")))
    assert rc == 4, stderr
    assert_one_error(stderr, "not a llamapro output")
    assert digest(out) == mine and digest(src) == before
    assert partials(out) == [] and not list(tmp_path.glob("precious.old-*"))


def test_force_replaces_an_empty_folder_or_a_previous_output(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    runner = CliRunner()
    result = runner.invoke(app, ["expand", "--every", "2", "--in", str(src), "--out", str(out)])
    assert result.exit_code == 4 and "already exists" in result.stderr  # no --force, even when empty
    result = runner.invoke(app, ["expand", "--every", "2", "--in", str(src), "--out", str(out), "--force"])
    assert result.exit_code == 0, result.stderr
    assert_complete(out)
    inode = out.stat().st_ino
    result = runner.invoke(app, ["expand", "--every", "4", "--in", str(src), "--out", str(out), "--force"])
    assert result.exit_code == 0, result.stderr
    assert out.stat().st_ino != inode  # renamed in, not rewritten in place
    assert_complete(out, layers=5)
    link = tmp_path / "link"
    link.symlink_to(out)
    result = runner.invoke(app, ["expand", "--every", "2", "--in", str(src), "--out", str(link), "--force"])
    assert result.exit_code == 4 and "symbolic link" in result.stderr
    assert_complete(out, layers=5)


@pytest.mark.parametrize(
    "layout",
    [
        "out-is-input",
        "out-inside-input",
        "out-is-parent",
        "out-via-link-into-input",
        "out-via-link-to-parent",
        "in-via-link",
    ],
)
def test_input_and_output_may_not_overlap(src: Path, tmp_path: Path, layout: str) -> None:
    (tmp_path / "to-in").symlink_to(src)
    (tmp_path / "to-tmp").symlink_to(tmp_path)
    before, listing = digest(src), sorted(p.name for p in tmp_path.iterdir())
    inp, out = {
        "out-is-input": (src, src),
        "out-inside-input": (src, src / "sub"),
        "out-is-parent": (src, tmp_path),
        "out-via-link-into-input": (src, tmp_path / "to-in" / "sub"),
        "out-via-link-to-parent": (src, tmp_path / "to-tmp"),
        "in-via-link": (tmp_path / "to-in", src / "x"),
    }[layout]
    result = CliRunner().invoke(
        app, ["expand", "--every", "2", "--in", str(inp), "--out", str(out), "--force"]
    )
    assert result.exit_code == 2, result.stderr
    assert_one_error(result.stderr, "overlap")
    assert digest(src) == before and sorted(p.name for p in tmp_path.iterdir()) == listing


# --- links out of the folder ----------------------------------------------------------------------------


def test_links_out_of_the_folder_are_not_carried(src: Path, tmp_path: Path) -> None:
    # A downloaded folder (git clone, tarball) can hold links; a file copied verbatim into the output
    # must not be one that points at, say, a private key beside it.
    secret = tmp_path / "secret.txt"
    secret.write_text("PRIVATE KEY")
    (src / "README.md").unlink()
    (src / "README.md").symlink_to(secret)
    (src / "tokenizer.json").symlink_to(secret)
    (src / "tokenizer_config.json").write_text("{}")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["expand", "--every", "2", "--in", str(src), "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert "not copied" in result.stderr and "tokenizer.json" in result.stderr
    assert (out / "tokenizer_config.json").read_text() == "{}"
    assert not (out / "tokenizer.json").exists()
    assert all(
        "PRIVATE KEY" not in p.read_text(errors="replace")
        for p in out.iterdir()
        if p.suffix != ".safetensors"
    )


def test_hub_cache_links_are_carried(demo: Path, tmp_path: Path) -> None:
    # The hub cache layout: snapshots/<rev>/<file> -> ../../blobs/<hash>; those links are the norm.
    repo = tmp_path / "models--org--name"
    snapshot, blobs = repo / "snapshots" / "0123abcd", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in demo.iterdir():
        shutil.copyfile(file, blobs / file.name)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", file.name))
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["expand", "--every", "2", "--in", str(snapshot), "--out", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.stderr
    assert (out / "generation_config.json").read_bytes() == (demo / "generation_config.json").read_bytes()
    assert not any(p.is_symlink() for p in out.iterdir())


# --- carried-over files: their I/O errors are input or output errors, never internal ---------------


@pytest.mark.parametrize("name", ["tokenizer.json", "README.md"])
def test_unreadable_companion_file_is_an_input_error(
    src: Path, tmp_path: Path, name: str, unprivileged: list[str]
) -> None:
    # A bare PermissionError from copying or reading would be an internal error (exit 101).
    (src / name).write_text("{}")
    (src / name).chmod(0)
    out = tmp_path / "out"
    rc, stdout, stderr = finish(start([*unprivileged, *expand_cmd(src, out)]))
    assert rc == 3, stderr
    assert_one_error(stderr, f"cannot read {src / name}", "Permission denied")
    assert stdout == ""
    assert_no_leftovers(out)


def test_companion_copy_hitting_a_size_limit_is_an_output_error(src: Path, tmp_path: Path) -> None:
    # The 9.8 MB shard fits under the limit, the 12 MB tokenizer does not: the write fails with EFBIG
    # while copying the carried file (a full disk fails there the same way, with ENOSPC).
    with open(src / "tokenizer.json", "wb") as f:
        f.write(b"x" * (12 << 20))

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (11 << 20, 11 << 20))

    out = tmp_path / "out"
    rc, stdout, stderr = finish(start(expand_cmd(src, out), preexec_fn=limit))
    assert rc == 4, stderr
    assert_one_error(stderr, "cannot write", "tokenizer.json", "File too large")
    assert stdout == ""
    assert_no_leftovers(out)
