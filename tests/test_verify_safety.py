"""verify-identity runs nothing a checkpoint carries and reads nothing from stdin.

A checkpoint may carry Python (`auto_map` in tokenizer_config.json or config.json naming a module beside
the weights). transformers runs it when told `trust_remote_code=True`, or when its "run the custom code?
[y/N]" question is answered `y` on stdin (`yes | ...` in CI). Each planted module here would create a
marker file; the tests assert the marker never appears, the exit code and the one-line error, and that
stdout carries nothing but data.
"""

from __future__ import annotations

import os

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # see test_verify.py

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llamapro_cli.demo import write_demo_checkpoint
from llamapro_cli.expand import expand

pytestmark = pytest.mark.hf  # the code would be run by transformers: without it there is nothing to test

EVIL = """from pathlib import Path
Path({marker!r}).write_text("checkpoint code ran")
"""


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("safety")
    write_demo_checkpoint(root / "base", layers=4)
    expand(root / "base", root / "pro", every=2)
    return root / "base", root / "pro"


def _plant(folder: Path, module: str, marker: Path) -> None:
    (folder / f"{module}.py").write_text(EVIL.format(marker=str(marker)))


def _edit_json(path: Path, **keys: object) -> None:
    doc = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**doc, **keys}, indent=2))


def _run(*args: str | Path, stdin: str = "yes") -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess, fed `yes` on stdin (or with stdin closed: `stdin="closed"`)."""
    command = [sys.executable, "-m", "llamapro_cli", "verify-identity", *map(str, args)]
    env = {**os.environ, "NO_COLOR": "1"}
    if stdin == "closed":
        shell = " ".join(f"'{a}'" for a in command) + " <&-"
        return subprocess.run(["bash", "-c", shell], capture_output=True, text=True, env=env, timeout=600)
    feed = subprocess.Popen(["yes"], stdout=subprocess.PIPE)
    try:
        return subprocess.run(
            command, stdin=feed.stdout, capture_output=True, text=True, env=env, timeout=600
        )
    finally:
        feed.kill()
        feed.wait()


@pytest.fixture
def evil_tokenizer(pair: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """The expansion with a tokenizer only its own (planted) code can build; and the marker it would write."""
    pro = shutil.copytree(pair[1], tmp_path / "pro")
    marker = tmp_path / "PWNED"
    _plant(pro, "tokenizer_evil", marker)
    _edit_json(
        pro / "tokenizer_config.json",
        tokenizer_class="EvilTokenizer",
        auto_map={"AutoTokenizer": ["tokenizer_evil.EvilTokenizer", None]},
    )
    return pro, marker


@pytest.mark.parametrize("stdin", ["yes", "closed"])
def test_tokenizer_that_needs_checkpoint_code_is_refused(
    evil_tokenizer: tuple[Path, Path], stdin: str
) -> None:
    pro, marker = evil_tokenizer
    result = _run("--out", pro, "--prompt", "def fib(n):", stdin=stdin)
    assert result.returncode == 3, result.stderr
    assert not marker.exists()
    assert result.stdout == ""  # no question, no prompt text: stdout is data only
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"error: {pro / 'tokenizer_config.json'}: auto_map asks transformers to run")
    assert "llamapro never runs code from a checkpoint" in lines[0]
    assert lines[1:] == ["hint: use --tokens N (seeded random token ids) instead of --prompt"]


def test_tokenizer_code_is_not_run_even_past_the_refusal(
    evil_tokenizer: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second line of defence: transformers itself is told trust_remote_code=False and reads an
    empty stdin, so even without the refusal nothing runs and nothing is asked."""
    import io

    from llamapro_cli.checkpoint import Checkpoint
    from llamapro_cli.errors import InputError
    from llamapro_cli.verify import hf_engine
    from llamapro_cli.verify.inputs import tokenize

    pro, marker = evil_tokenizer
    monkeypatch.setattr(hf_engine, "refuse_remote_code", lambda *a, **k: None)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 100))
    ckpt = Checkpoint.open(pro)
    with pytest.raises(InputError, match="cannot use the tokenizer"):
        tokenize(ckpt, ckpt, "def fib(n):")
    assert not marker.exists()
    assert sys.stdin.read() == "y\n" * 100  # not one answer was consumed
    from transformers import AutoTokenizer

    with pytest.raises(Exception):  # noqa: B017 - the planted class is no tokenizer; it ran all the same
        AutoTokenizer.from_pretrained(pro, trust_remote_code=True)
    assert marker.exists(), "the planted code is not what transformers would run: the test proves nothing"


def test_model_auto_map_beside_a_model_transformers_implements_runs_no_checkpoint_code(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """Hub configs of families transformers implements may keep an `auto_map` (InternLM3's do):
    transformers' own class runs, the checkpoint's modules never."""
    marker = tmp_path / "PWNED"
    auto_map = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
    }
    folders = []
    for source in pair:
        folder = shutil.copytree(source, tmp_path / source.name)
        _plant(folder, "configuration_evil", marker)
        _plant(folder, "modeling_evil", marker)
        _edit_json(folder / "config.json", auto_map=auto_map)
        folders.append(folder)
    result = _run("--in", folders[0], "--out", folders[1], "--engine", "transformers")
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    assert result.stdout.startswith("verdict: IDENTICAL\n")


def test_model_only_checkpoint_code_could_build_is_refused(
    pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model type transformers does not implement, with `auto_map`: the transformers engine would need
    the checkpoint's code, so it is refused (a registry family an older transformers lacks: simulated)."""
    from llamapro_cli.verify import hf_engine

    folder = shutil.copytree(pair[1], tmp_path / "pro")
    marker = tmp_path / "PWNED"
    _plant(folder, "modeling_evil", marker)
    _edit_json(folder / "config.json", auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    monkeypatch.setattr(hf_engine, "_implemented", lambda model_type: False)
    from typer.testing import CliRunner

    from llamapro_cli.cli.app import app

    result = CliRunner().invoke(app, ["verify-identity", "--in", str(pair[0]), "--out", str(folder)])
    assert result.exit_code == 3 and result.stdout == "" and not marker.exists()
    assert result.stderr.splitlines() == [
        f"error: {folder / 'config.json'}: transformers has no 'llama' model of its own and auto_map asks "
        "it to run the checkpoint's code ({'AutoModelForCausalLM': 'modeling_evil.EvilForCausalLM'}); "
        "llamapro never runs code from a checkpoint",
        "hint: use --engine native, which runs no code from the checkpoint (llama, mistral, qwen2, qwen3)",
    ]


def test_transformers_sees_an_empty_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a transformers version might ask while it loads (today it asks nothing when told
    trust_remote_code=False), the answer is end-of-file, never a line piped in for something else."""
    import io

    from llamapro_cli.verify.hf_engine import sealed

    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    with sealed(), pytest.raises(EOFError):
        input("run the custom code? [y/N] ")
    assert sys.stdin.read() == "y\n"  # restored, untouched
