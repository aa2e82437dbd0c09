"""The CLI contract for `inspect` and `expand`: stdout is data, stderr is messages, exit codes as documented,
and neither command imports torch or transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llamapro_cli.cli.app import app
from llamapro_cli.demo import write_demo_checkpoint


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_checkpoint(tmp_path_factory.mktemp("demo") / "llama", layers=8)


def test_inspect_table(demo: Path) -> None:
    result = CliRunner().invoke(app, ["inspect", str(demo)])
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    for text in ("llama", "8 under model.layers.", "BF16", "2 shard(s)", "not expanded"):
        assert text in result.stdout


def test_inspect_json_and_expanded(demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "pro"
    run = CliRunner().invoke(app, ["expand", "--every", "4", "--in", str(demo), "--out", str(out), "--quiet"])
    assert run.exit_code == 0, run.stderr
    assert run.stderr == ""
    doc = json.loads(CliRunner().invoke(app, ["inspect", str(out), "--json"]).stdout)
    assert doc["schema_version"] == 1
    assert doc["num_layers"] == 10 and doc["architecture"] == "llama"
    assert doc["expanded"]["new_layers"] == [4, 9] and doc["expanded"]["sources"] == [3, 7]
    assert doc["expanded"]["num_layers_in"] == 8
    assert doc["parameters"] == sum(doc["parameters_per_layer"]) + doc["parameters_outside_layers"]
    base = json.loads(CliRunner().invoke(app, ["inspect", str(demo), "--json"]).stdout)
    per_layer = base["parameters_per_layer"][0]
    assert doc["parameters"] == base["parameters"] + 2 * per_layer
    table = CliRunner().invoke(app, ["inspect", str(out)]).stdout
    assert "4<-3" in table and "9<-7" in table


def test_expand_json_report(demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "pro"
    result = CliRunner().invoke(app, ["expand", "--add", "2", "--in", str(demo), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["num_layers_out"] == 10 and doc["zeroed"] == 4 and not doc["dry_run"]
    assert doc["total_size"] == (out / "model.safetensors").stat().st_size


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["inspect", "/nonexistent/folder"], 3),
        (["expand", "--every", "4", "--in", "/nonexistent/x", "--out", "/tmp/never-llamapro"], 3),
        (["expand", "--every", "4", "--after", "1", "--in", "DEMO", "--out", "OUT"], 2),
        (["expand", "--in", "DEMO", "--out", "OUT"], 2),
        (["expand", "--every", "4", "--placement", "top", "--in", "DEMO", "--out", "OUT"], 2),
        (["expand", "--every", "4", "--in", "DEMO", "--out", "OUT", "--max-shard-size", "lots"], 2),
        (["expand", "--after", "1,x", "--in", "DEMO", "--out", "OUT"], 2),
    ],
)
def test_errors_are_one_line(demo: Path, tmp_path: Path, args: list[str], code: int) -> None:
    args = [str(demo) if a == "DEMO" else str(tmp_path / "o") if a == "OUT" else a for a in args]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == code, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: ") and len(lines) <= 2
    assert all(line.startswith("hint: ") for line in lines[1:])
    assert result.stdout == "" and not (tmp_path / "o").exists()


def test_unsupported_architecture(tmp_path: Path) -> None:
    src = write_demo_checkpoint(tmp_path / "m", layers=2)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    result = CliRunner().invoke(app, ["inspect", str(src)])
    assert result.exit_code == 3
    assert result.stderr.startswith("error: unsupported architecture: model_type 'bert'")
    assert "hint: supported model types:" in result.stderr


def test_help_lists_commands_and_exit_codes() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for text in ("inspect", "expand", "Exit codes"):
        assert text in result.stdout
    expand_help = CliRunner().invoke(app, ["expand", "--help"]).stdout
    for option in (
        "--every",
        "--copies",
        "--after",
        "--add",
        "--placement",
        "--dry-run",
        "--force",
        "--digests",
    ):
        assert option in expand_help


_PROBE = """
import sys
from typer.testing import CliRunner
from llamapro_cli.cli.app import app
r = CliRunner().invoke(app, sys.argv[1:])
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print(f"{r.exit_code}|{','.join(heavy)}")
"""


def test_inspect_and_expand_never_import_torch(demo: Path, tmp_path: Path) -> None:
    for args in (
        ["--help"],
        ["inspect", str(demo)],
        ["expand", "--every", "4", "--in", str(demo), "--out", str(tmp_path / "o"), "--quiet"],
    ):
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, check=True
        )
        assert proc.stdout.strip().splitlines()[-1] == "0|", (args, proc.stdout, proc.stderr)


def test_python_dash_m_and_version() -> None:
    proc = subprocess.run([sys.executable, "-m", "llamapro_cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("llamapro ")
