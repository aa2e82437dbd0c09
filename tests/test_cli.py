"""The CLI contract: stdout is data, stderr is messages, exit codes as documented, `inspect` and `expand`
never import torch or transformers; the commands are thin twins of the library's verbs, with their
examples as data, closed choices as the library's enums, and one way to write a plan's options."""

from __future__ import annotations

import ast
import importlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from llamapro_cli.cli.app import COMMANDS, app
from llamapro_cli.demo import write_demo_checkpoint
from llamapro_cli.plan import plan_options

ROOT = Path(__file__).resolve().parent.parent


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


# --- the cli/ wing: thin commands, library twins, examples as data ----------------------------------------


def _click_command(name: str) -> Any:
    group = typer.main.get_command(app)
    return getattr(group, "commands", {})[name]


def test_every_command_has_its_library_twin_in_the_api_table() -> None:
    page = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `llamapro ([a-z-]+)` \| (.+?) \|", page, flags=re.M))
    assert set(rows) == {spec.name for spec in COMMANDS}
    for name, cell in rows.items():
        for function in re.findall(r"`([a-z_.]+)`", cell):
            module, _, attr = f"llamapro_cli.{function}".rpartition(".")
            assert callable(getattr(importlib.import_module(module), attr)), (name, function)


def test_examples_name_only_real_options() -> None:
    for spec in COMMANDS:
        options = {opt for param in _click_command(spec.name).params for opt in param.opts}
        assert spec.examples and spec.examples == tuple(dict.fromkeys(spec.examples))
        for example in spec.examples:
            command = re.split(r"\s{2,}\(|&&|\|", example)[0]
            words = shlex.split(command)
            assert words[:2] == ["llamapro", spec.name], example
            used = {w for w in words if w.startswith("-")}
            assert used <= options, (example, used - options)
        help_text = CliRunner().invoke(app, [spec.name, "--help"], env={"COLUMNS": "200"}).stdout
        for example in spec.examples:
            assert " ".join(example.split()[:3]) in help_text


def test_help_shows_placeholders_and_closed_choices() -> None:
    expected = {
        "inspect": ["inspect [OPTIONS] CHECKPOINT", "--revision REV"],
        "expand": ["--in CHECKPOINT", "--out DIR", "--every N", "--placement [interleave|top|bottom]"],
        "verify-identity": [
            "--engine [auto|transformers|native|vllm|llama.cpp|mlx]",
            "--device [auto|cuda|cpu]",
            "--tokens N",
            "--engine-python PATH",
        ],
        "gguf-pattern": ["gguf-pattern [OPTIONS] EXPANDED GGUF_IN GGUF_OUT", "--engine-python PATH"],
        "freeze-map": ["--format [text|names|json|regex|axolotl|llama-factory|peft|swift|hf]"],
        "verify-frozen": ["--map MANIFEST_OR_EXPANDED", "--trained TRAINED"],
        "push": ["push [OPTIONS] DIR REPO_ID"],
        "demo-checkpoint": ["demo-checkpoint [OPTIONS] DIR", "--layers N"],
    }
    for name, needles in expected.items():
        text = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "200"}).stdout
        assert not re.search(r"<(str|int|float|path)>|\{[a-z_]+\}", text), name
        for needle in needles:
            assert needle in text, (name, needle)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["expand", "--add", "2", "--placement", "sideways"], "--placement 'sideways' is not one of"),
        (["freeze-map", "DEMO", "--format", "yaml"], "--format 'yaml' is not one of text, names, json"),
        (["verify-identity", "--device", "tpu"], "--device 'tpu' is not one of auto, cuda, cpu"),
    ],
)
def test_a_closed_choice_outside_its_enum_is_a_one_line_usage_error(
    demo: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    args = [str(demo) if a == "DEMO" else a for a in args]
    if args[0] == "expand":
        args += ["--in", str(demo), "--out", str(tmp_path / "o")]
    if args[0] == "verify-identity":
        args += ["--out", str(demo)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: {message}") and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_closed_choice_reaches_the_library_as_its_enum(demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "top"
    result = CliRunner().invoke(
        app, ["expand", "--add", "2", "--placement", "TOP", "--in", str(demo), "--out", str(out), "--json"]
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["plan"]["placement"] == "top"
    assert json.loads((out / "llamapro.json").read_text())["plan"]["placement"] == "top"


def test_inspect_the_card_and_the_record_give_the_same_plan_options(demo: Path, tmp_path: Path) -> None:
    for options, canonical in (
        (["--every", "4", "--copies", "1"], "--every 4"),
        (["--every", "4", "--copies", "2"], "--every 4 --copies 2"),
        (["--add", "2", "--placement", "interleave"], "--add 2"),
        (["--after", "5,1,1"], "--after 1,1,5"),
    ):
        out = tmp_path / "-".join(options).strip("-")
        written = CliRunner().invoke(app, ["expand", *options, "--in", str(demo), "--out", str(out)])
        assert written.exit_code == 0, written.stderr
        assert re.search(rf"^plan +{re.escape(canonical)} *$", written.stdout, flags=re.M)
        record = json.loads((out / "llamapro.json").read_text())["plan"]
        assert plan_options(record) == canonical
        assert f"Plan: `{canonical}`." in (out / "README.md").read_text()
        table = CliRunner().invoke(app, ["inspect", str(out)], env={"COLUMNS": "300"}).stdout
        assert f"({canonical});" in table


def test_library_modules_never_import_the_cli() -> None:
    package = ROOT / "llamapro_cli"
    for path in package.rglob("*.py"):
        if path.parent.name == "cli" or path.name == "__main__.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in imported if m.startswith("llamapro_cli.cli")], path
    for path in (package / "cli").glob("*.py"):
        assert len(path.read_text(encoding="utf-8").splitlines()) <= 400, path
