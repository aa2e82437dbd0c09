"""Regression tests for bugs found reviewing the data path of `expand` (copy engines, output folder).

Each test failed before its fix. Failures are driven through a real `llamapro expand` subprocess where
the fault is a process property (a file-size limit, dropped root capabilities), so the exit code and
the one-line error are the ones a user sees.
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest


def _expand(src: Path, out: Path, prefix: list[str] | None = None, **kw: object) -> tuple[int, str, str]:
    cmd = [*(prefix or []), sys.executable, "-m", "llamapro_cli", "expand", "--every", "2"]
    proc = subprocess.run(
        [*cmd, "--in", str(src), "--out", str(out)], capture_output=True, text=True, timeout=120, **kw
    )  # type: ignore[call-overload]
    return proc.returncode, proc.stdout, proc.stderr


def _one_error(stderr: str, *says: str) -> None:
    lines = stderr.splitlines()
    assert lines and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    assert "internal error" not in stderr, stderr
    for text in says:
        assert text in lines[0], (text, stderr)


def _no_leftovers(out: Path) -> None:
    assert not out.exists()
    assert list(out.parent.glob(out.name + ".partial-*")) == []


# --- carried-over files: their I/O errors were internal errors (exit 101) -------------------------------


@pytest.mark.parametrize("name", ["tokenizer.json", "README.md"])
def test_unreadable_companion_file_is_an_input_error(
    src: Path, tmp_path: Path, name: str, unprivileged: list[str]
) -> None:
    # Found by review: shutil.copyfile / read_text raised a bare PermissionError, which the CLI reports
    # as "internal error ... report it" with exit 101.
    (src / name).write_text("{}")
    (src / name).chmod(0)
    out = tmp_path / "out"
    rc, stdout, stderr = _expand(src, out, unprivileged)
    assert rc == 3, stderr
    _one_error(stderr, f"cannot read {src / name}", "Permission denied")
    assert stdout == ""
    _no_leftovers(out)


def test_companion_copy_hitting_a_size_limit_is_an_output_error(src: Path, tmp_path: Path) -> None:
    # The 9.8 MB shard fits under the limit, the 12 MB tokenizer does not: the write fails with EFBIG
    # while copying the carried file (a full disk fails there the same way, with ENOSPC).
    with open(src / "tokenizer.json", "wb") as f:
        f.write(b"x" * (12 << 20))

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (11 << 20, 11 << 20))

    out = tmp_path / "out"
    rc, stdout, stderr = _expand(src, out, preexec_fn=limit)
    assert rc == 4, stderr
    _one_error(stderr, "cannot write", "tokenizer.json", "File too large")
    assert stdout == ""
    _no_leftovers(out)
