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
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llamapro_cli.cli.app import app
from llamapro_cli.errors import InputError
from llamapro_cli.io.header import read_header
from llamapro_cli.io.leftovers import MARKER
from llamapro_cli.io.manifest import MANIFEST, remove_owned
from llamapro_cli.io.sources import SourceFiles

# 4 layers -> 6 layers: a 9.8 MB output shard; 256 KiB chunks with 0.1 s pauses take about 4 s to copy.
PROGRESS_LINE = re.compile(r"^[a-z-]+: .*\(\d+%\)")
SLOW = {"LLAMAPRO_COPY_CHUNK": str(256 * 1024), "LLAMAPRO_TEST_CHUNK_DELAY": "0.1"}


def digest(root: Path) -> dict[str, str]:
    """Every entry under `root`: file bytes, link targets (never followed), folders."""

    def one(p: Path) -> str:
        if p.is_symlink():
            return "link:" + os.readlink(p)
        return "folder" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()

    return {str(p.relative_to(root)): one(p) for p in sorted(root.rglob("*"))}


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
    # Plain progress lines ("expand: 9.75 MB of 9.76 MB (100%), 10 s") come every ~10 s on a slow run.
    lines = [line for line in stderr.splitlines() if not PROGRESS_LINE.match(line)]
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


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)]
)
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
    "before-the-copy": ("llamapro_cli.surgery", "prepare", EXPAND_ARGS, signal.SIGTERM),
    "after-the-copy": ("llamapro_cli.cli.expand", "render_expand", EXPAND_ARGS, signal.SIGINT),
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


def test_unreachable_target_folder(src: Path, tmp_path: Path, unprivileged: list[str]) -> None:
    # A folder above --out that we may not search: the real run says so (exit 4), a dry run (which
    # writes nothing) still reports the plan; never a bare PermissionError.
    closed = tmp_path / "closed"
    (closed / "sub").mkdir(parents=True)
    closed.chmod(0)
    try:
        rc, stdout, stderr = finish(start([*unprivileged, *expand_cmd(src, closed / "sub" / "out")]))
        assert rc == 4, stderr
        assert_one_error(stderr, f"cannot create {closed / 'sub' / 'out'}", "Permission denied")
        rc, stdout, stderr = finish(
            start([*unprivileged, *expand_cmd(src, closed / "sub" / "out", "--dry-run")])
        )
        assert rc == 0 and "would write" in stdout, stderr
    finally:
        closed.chmod(0o755)
    assert list((closed / "sub").iterdir()) == []


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


# --- carried files: data only ---------------------------------------------------------------------------

CODE_FILES = {
    "tokenizer_evil.py": b"open('/tmp/pwned', 'w')\n",  # matches tokenizer*
    "tokenizer.cpython-311.pyc": b"\xa7\r\r\n" + b"\0" * 12,
    "tokenizer_ext.so": b"\x7fELF\x02\x01\x01" + b"\0" * 9,
    "tokenizer.so.1": b"anything",  # a versioned shared library
    "tokenizer_setup": b"#!/bin/sh\ntouch /tmp/pwned\n",  # no suffix: found by its first bytes
    "tokenizer.model": b"\x7fELF\x02\x01\x01\x00",  # a data name, a program's content
    "chat_template.pkl": b"\x80\x04\x95",  # a pickle: loading it runs code
    "LICENSE.exe": b"MZ\x90\x00",
}


def test_only_data_files_are_carried(src: Path, tmp_path: Path) -> None:
    # Names are allow-listed (`tokenizer*`), but a name says nothing about what a file does: every
    # carried file must be data, by its suffixes and by its first bytes.
    for name, data in CODE_FILES.items():
        (src / name).write_bytes(data)
    (src / "tokenizer.json").write_text('{"model": {}}')
    (src / "tokenizer.loop").symlink_to("tokenizer.loop")  # a link loop: nothing to carry, no crash
    before, out = digest(src), tmp_path / "out"
    result = CliRunner().invoke(app, ["expand", "--every", "2", "--in", str(src), "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert (out / "tokenizer.json").read_text() == '{"model": {}}'
    written = {p.name for p in out.iterdir()}
    for name in CODE_FILES:
        assert name not in written, name
        assert f"{name} is not copied: only data files are carried" in result.stderr, name
    assert "tokenizer.loop is not copied: it is a link that never ends" in result.stderr
    assert digest(src) == before


# --- --force removes only what expand wrote -----------------------------------------------------------


def _previous_output(src: Path, out: Path) -> None:
    result = CliRunner().invoke(app, ["expand", "--every", "2", "--in", str(src), "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert (out / MANIFEST).is_file()


def _trainer_checkpoint(out: Path) -> None:  # trainers save into the model folder
    (out / "checkpoint-1000").mkdir()
    (out / "checkpoint-1000" / "optimizer.pt").write_bytes(b"days of GPU time")


def _rewritten_shard(out: Path) -> None:  # save_pretrained over ours: same name, same size
    shard = out / "model.safetensors"
    shard.write_bytes(bytes(reversed(shard.read_bytes())))


def _linked_record(out: Path) -> None:
    (out / "llamapro.json").unlink()
    (out / "llamapro.json").symlink_to("/etc/hostname")


def _notes(out: Path) -> None:
    (out / "notes.txt").write_text("mine")


@pytest.mark.parametrize(
    ("change", "names"),
    [
        (_trainer_checkpoint, "checkpoint-1000"),
        (_rewritten_shard, "model.safetensors"),
        (_linked_record, "llamapro.json"),
        (_notes, "notes.txt"),
    ],
    ids=["trainer-checkpoint", "rewritten-shard", "linked-record", "notes"],
)
def test_force_never_removes_what_expand_did_not_write(
    src: Path, tmp_path: Path, change: Callable[[Path], None], names: str
) -> None:
    out = tmp_path / "pro"
    _previous_output(src, out)
    change(out)
    before, mine = digest(src), digest(out)
    rc, stdout, stderr = finish(start(expand_cmd(src, out, "--force")))
    assert rc == 4, stderr
    assert_one_error(stderr, "not a llamapro output", str(out / names))
    assert stdout == "" and digest(out) == mine and digest(src) == before
    assert partials(out) == [] and not list(tmp_path.glob("pro.old-*"))


@pytest.mark.parametrize("record", ["not-json", "link"])
def test_force_ignores_a_record_file_without_the_list_of_written_files(
    src: Path, tmp_path: Path, record: str
) -> None:
    # A file named llamapro.json proves nothing: a folder without the list of what expand wrote is
    # not a previous output, whatever it holds.
    out = tmp_path / "precious"
    out.mkdir()
    (out / "checkpoint-5000").mkdir()
    (out / "notes.txt").write_text("days of work")
    if record == "link":
        (out / "llamapro.json").symlink_to("/etc/hostname")
    else:
        (out / "llamapro.json").write_text("not json")
    mine = digest(out)
    result = CliRunner().invoke(
        app, ["expand", "--every", "2", "--in", str(src), "--out", str(out), "--force"]
    )
    assert result.exit_code == 4, result.stderr
    assert_one_error(result.stderr, "not a llamapro output", str(out / "checkpoint-5000"))
    assert digest(out) == mine and (out / "llamapro.json").is_symlink() == (record == "link")


def test_files_written_after_the_force_check_are_kept(src: Path, tmp_path: Path) -> None:
    # The old output is checked again once renamed aside, before anything of it is removed: a file a
    # trainer saved during the run stays, with the folder, and the run says where.
    out = tmp_path / "pro"
    _previous_output(src, out)
    aside = tmp_path / "pro.old-0000000a"
    out.rename(aside)
    (aside / "trainer_state.json").write_text("{}")
    assert remove_owned(aside) == (aside / "trainer_state.json", "was not written by llamapro expand")
    assert (aside / "model.safetensors").is_file() and (aside / "trainer_state.json").read_text() == "{}"
    (aside / "trainer_state.json").unlink()
    assert remove_owned(aside) is None and not aside.exists()


# --- paths the run writes: lock, --out name, links into the output ---------------------------------------


def test_a_link_at_the_lock_path_is_never_followed(src: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    lock = tmp_path / ".out.llamapro-lock"
    lock.symlink_to(victim)
    result = CliRunner().invoke(
        app, ["expand", "--every", "2", "--in", str(src), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 4, result.stderr
    assert_one_error(result.stderr, "is a symbolic link")
    assert not victim.exists() and lock.is_symlink() and not (tmp_path / "out").exists()


def test_hostile_leftover_markers_are_not_ours(src: Path, tmp_path: Path) -> None:
    # Planted temporary folders whose marker is a FIFO or a link to /dev/zero (reading it would block or
    # never end), or names a pid or start time no process can have (os.kill and float() would raise):
    # none is a marker of ours, each folder is left, the run completes.
    plants: dict[str, Callable[[Path], None]] = {
        "out.partial-0000000f": os.mkfifo,
        "out.partial-0000001f": lambda m: m.symlink_to("/dev/zero"),
        "out.partial-0000002f": lambda m: m.write_text(json.dumps({"pid": 2**40, "started": 0})),
        "out.partial-0000003f": lambda m: m.write_text('{"pid": 1, "started": 1' + "0" * 400 + "}"),
        "out.partial-0000004f": lambda m: m.write_text('{"pid": 1, "started": NaN}'),
    }
    for name, plant in plants.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "data").write_text("keep")
        plant(tmp_path / name / MARKER)
    rc, _, stderr = finish(start(expand_cmd(src, tmp_path / "out")), timeout=60)
    assert rc == 0, stderr
    assert all((tmp_path / name / "data").read_text() == "keep" for name in plants)


def test_an_out_that_is_a_link_loop_is_an_output_error(src: Path, tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to("loop")
    result = CliRunner().invoke(
        app, ["expand", "--every", "2", "--in", str(src), "--out", str(tmp_path / "loop")]
    )
    assert result.exit_code == 4, result.stderr
    assert_one_error(result.stderr, "a link that never ends")
    assert (tmp_path / "loop").is_symlink() and partials(tmp_path / "loop") == []


@pytest.mark.parametrize("dry_run", [False, True])
def test_an_out_named_like_a_temporary_folder_is_refused(src: Path, tmp_path: Path, dry_run: bool) -> None:
    # inspect refuses such a folder as input: expand must not create one as an output.
    out = tmp_path / "x.partial-0123abcd"
    args = ["expand", "--every", "2", "--in", str(src), "--out", str(out), *(["--dry-run"] * dry_run)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.stderr
    assert_one_error(result.stderr, "named like the temporary folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_force_never_replaces_an_output_the_input_links_into(src: Path, tmp_path: Path) -> None:
    # view/ is made of links into a previous output pro/: replacing pro would delete view's data.
    pro = tmp_path / "pro"
    _previous_output(src, pro)
    view = tmp_path / "view"
    view.mkdir()
    for p in pro.iterdir():
        (view / p.name).symlink_to(p)
    before = digest(pro)
    result = CliRunner().invoke(
        app, ["expand", "--every", "2", "--in", str(view), "--out", str(pro), "--force"]
    )
    assert result.exit_code == 2, result.stderr
    assert_one_error(result.stderr, "overlap", "would replace or delete")
    assert digest(pro) == before and all(p.is_symlink() for p in view.iterdir())
    assert not list(tmp_path.glob("pro.*"))


# --- inputs that change during the run -----------------------------------------------------------------


def _longer_header_copy(shard: Path, dest: Path) -> None:
    """A valid shard with the same tensors and a 4 KiB longer header (every data offset shifts)."""
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"]["padding"] = "x" * 4096
    text = json.dumps(header).encode()
    dest.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])


@pytest.mark.parametrize("engine", ["buffered", "direct"])
@pytest.mark.parametrize("how", ["replaced", "rewritten"])
def test_an_input_changed_during_the_copy_is_refused(
    src: Path, tmp_path: Path, engine: str, how: str
) -> None:
    # Each source is opened once, stamped at its header read, and checked after each output shard.
    shard = src / "model-00002-of-00002.safetensors"
    _longer_header_copy(shard, tmp_path / "swap.safetensors")
    out = tmp_path / "out"
    # ~1 s of copying (1 MiB chunks, 0.1 s apart): the change lands mid-copy, the test stays short.
    env = {"LLAMAPRO_COPY_CHUNK": str(1 << 20), "LLAMAPRO_TEST_CHUNK_DELAY": "0.1"}
    env["LLAMAPRO_DIRECT_IO"] = "1" if engine == "direct" else "0"
    proc = start(expand_cmd(src, out), env=env)
    wait_for(copying(out), "the copy to start")
    if how == "replaced":
        os.replace(tmp_path / "swap.safetensors", shard)  # what a re-download does
    else:
        with open(shard, "r+b") as f:  # same file, new bytes (an in-place edit)
            f.write(f.read(8))
    rc, stdout, stderr = finish(proc)
    assert rc == 3, stderr
    assert_one_error(stderr, str(shard), "changed while llamapro was reading it")
    assert stdout == ""
    assert_no_leftovers(out)


def test_a_source_is_read_only_if_it_is_the_file_whose_header_was_read(src: Path) -> None:
    # The window between the header read and the copy: a file swapped in there is refused on open.
    shard = src / "model-00002-of-00002.safetensors"
    header = read_header(shard)
    _longer_header_copy(shard, src / "swap")
    os.replace(src / "swap", shard)
    assert header.stamp is not None
    with (
        SourceFiles({shard: header.stamp}) as files,
        pytest.raises(InputError, match="whose header was read"),
    ):
        files.open_all()


# --- the input folder cannot be read ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o600, 0o300, 0o000], ids=["unsearchable", "unlistable", "closed"])
def test_an_unreadable_input_folder_is_an_input_error(
    src: Path, tmp_path: Path, unprivileged: list[str], mode: int
) -> None:
    src.chmod(mode)
    try:
        for cmd in (
            expand_cmd(src, tmp_path / "out"),
            [sys.executable, "-m", "llamapro_cli", "inspect", str(src)],
        ):
            rc, stdout, stderr = finish(start([*unprivileged, *cmd]))
            assert rc == 3, stderr
            assert_one_error(stderr, f"cannot read {src}", "Permission denied")
            assert stdout == ""
    finally:
        src.chmod(0o755)
    assert_no_leftovers(tmp_path / "out")


# --- free space the filesystem cannot report -------------------------------------------------------------


@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Path]:
    """A real ramfs mount: it reports no capacity at all (statvfs f_blocks == 0)."""
    if os.geteuid() != 0:
        pytest.skip("mounting ramfs needs root")
    mount = tmp_path / "ramfs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount ramfs here (no CAP_SYS_ADMIN?)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_filesystem_without_capacity_figures_is_not_full(src: Path, ramfs: Path) -> None:
    assert os.statvfs(ramfs).f_blocks == 0
    result = CliRunner().invoke(
        app, ["expand", "--every", "2", "--in", str(src), "--out", str(ramfs / "out")]
    )
    assert result.exit_code == 0, result.stderr
    assert_complete(ramfs / "out")
    dry = CliRunner().invoke(
        app, ["expand", "--every", "2", "--in", str(src), "--out", str(ramfs / "o2"), "--dry-run", "--json"]
    )
    assert dry.exit_code == 0 and json.loads(dry.stdout)["free_space"] is None


def test_the_free_space_check_can_be_skipped(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "statvfs", lambda path: fake_statvfs(blocks=10**9, free=10**3))
    monkeypatch.setenv("LLAMAPRO_SKIP_SPACE_CHECK", "1")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["expand", "--every", "2", "--in", str(src), "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    monkeypatch.undo()
    assert_complete(out)
