"""The CLI contract: stdout is data, stderr is messages, exit codes as documented, `inspect` and `expand`
never import torch or transformers; the commands are thin twins of the library's verbs, with their
examples as data, closed choices as the library's enums, and one way to write a plan's options."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import os
import pty
import re
import shlex
import shutil
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
        ["relayer", "--layers", "0-3,1-2z", "--in", str(demo), "--out", str(tmp_path / "r"), "--quiet"],
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


# --- output meant for pipes and terminals -----------------------------------------------------------------


def _piped(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI as a shell pipeline runs it: stdout and stderr are pipes, the terminal is 40 columns."""
    return subprocess.run(
        [sys.executable, "-m", "llamapro_cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "40", **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def _on_a_terminal(*args: str, env: dict[str, str]) -> bytes:
    """stdout of the CLI when stdout is a terminal (a pseudo-terminal), as the terminal receives it."""
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamapro_cli", *args],
        stdout=secondary,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "100", **env},
    )
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(primary)
    assert proc.wait(timeout=60) == 0
    return b"".join(chunks)


def test_piped_tables_have_whole_rows_and_no_trailing_spaces(demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "pro"
    assert _piped("expand", "--every", "4", "--in", str(demo), "--out", str(out), "-q").returncode == 0
    for args in (
        ["inspect", str(out)],
        ["inspect", str(demo)],
        ["expand", "--every", "2", "--in", str(demo), "--out", str(tmp_path / "dry"), "--dry-run"],
    ):
        proc = _piped(*args)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines and all(line == line.rstrip() for line in lines), args
        assert not any(line.startswith(" ") for line in lines), args  # no wrapped continuation
    table = _piped("inspect", str(out)).stdout
    expanded = next(line for line in table.splitlines() if line.startswith("expanded "))
    assert expanded.endswith("(--every 4); new layers (new<-source): 4<-3, 9<-7")
    assert "checkpoint       " + str(out) + "\n" in table  # keys padded to one column, two spaces apart


def test_no_color_removes_all_styling_on_a_terminal(demo: Path) -> None:
    styled = _on_a_terminal("inspect", str(demo), env={})
    assert b"\x1b[1m" in styled  # bold keys on a colour terminal: the check below can see styling
    plain = _on_a_terminal("inspect", str(demo), env={"NO_COLOR": "1"})
    assert b"\x1b" not in plain and b"tied embeddings" in plain


def test_prompt_input_is_counted_in_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    from llamapro_cli.cli.verify import render_identity
    from llamapro_cli.verify.identity import IdentityReport, Verdict

    values: dict[str, Any] = {f.name: None for f in dataclasses.fields(IdentityReport)}
    values.update(
        verdict=Verdict.IDENTICAL,
        expanded="pro",
        base="base",
        architecture="llama",
        num_layers_in=8,
        num_layers_out=10,
        new_layers=(4, 9),
        mapping="llamapro.json",
        engine="native",
        device="cpu",
        dtype="bfloat16",
        input="prompt",
        seed=None,
        tokens=15,
        prefill=7,
        decode_steps=8,
        atol=0.0,
        full_max_abs=0.0,
        cached_max_abs=0.0,
        greedy_tokens_equal=True,
        warnings=(),
        seconds=1.0,
        peak_rss_bytes=1,
    )
    render_identity(IdentityReport(**values))
    shown = capsys.readouterr().out
    assert re.search(r"^input +15 prompt tokens: prefill 7, then 8 cached", shown, flags=re.M), shown
    render_identity(IdentityReport(**{**values, "input": "random token ids", "seed": 0, "tokens": 32}))
    assert "32 random token ids, seed 0: prefill" in capsys.readouterr().out


def test_a_shard_over_max_shard_size_gets_a_note(demo: Path, tmp_path: Path) -> None:
    args = ["expand", "--every", "4", "--in", str(demo), "--max-shard-size"]
    # The embedding (1024 x 256 bf16, 512 KiB) and the head are larger than 520KB: a shard each.
    written = CliRunner().invoke(app, [*args, "520KB", "--out", str(tmp_path / "a")])
    assert written.exit_code == 0, written.stderr
    assert re.search(
        r"^note: 2 shards are over --max-shard-size 520KB \(the largest: model-\d+-of-\d+\.safetensors, "
        r"528\.\d\d KB\): a tensor larger than the limit gets a shard of its own",
        written.stderr,
        flags=re.M,
    ), written.stderr
    sizes = [p.stat().st_size for p in (tmp_path / "a").glob("model-*.safetensors")]
    assert sum(size > 520_000 for size in sizes) == 2
    dry = CliRunner().invoke(app, [*args, "520KB", "--out", str(tmp_path / "b"), "--dry-run"])
    assert "note: 2 shards would be over --max-shard-size 520KB" in dry.stderr
    fits = CliRunner().invoke(app, [*args, "5GB", "--out", str(tmp_path / "c"), "--dry-run"])
    assert fits.exit_code == 0 and "note:" not in fits.stderr
    quiet = CliRunner().invoke(app, [*args, "520KB", "--out", str(tmp_path / "d"), "--dry-run", "-q"])
    assert quiet.exit_code == 0 and quiet.stderr == ""


# --- what reaches the terminal: data is never markup, never raw control bytes; stdout failures --------------

RAW_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # what may never come from data (\t, \n may)
HOSTILE_SHARD = "model-[bold red]x\x1b[31m\r\x07.safetensors"


@pytest.fixture(scope="module")
def hostile(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo, with rich markup in an architecture name and markup plus ESC, CR and BEL in a shard
    name and in a file name `expand` does not copy."""
    folder = tmp_path_factory.mktemp("hostile") / "evil"
    shutil.copytree(demo, folder)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    old = "model-00001-of-00002.safetensors"
    (folder / old).rename(folder / HOSTILE_SHARD)
    index["weight_map"] = {k: HOSTILE_SHARD if v == old else v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["[/]", "LlamaForCausalLM"]}))
    (folder / "evil\x1b[2J\x07.bin").write_bytes(b"not a weight")
    return folder


def test_markup_in_names_is_shown_as_text(hostile: Path, tmp_path: Path) -> None:
    piped = _piped("inspect", str(hostile))
    assert piped.returncode == 0, piped.stderr
    assert "(llama; [/], LlamaForCausalLM)" in piped.stdout
    assert "model-[bold red]x\\x1b[31m\\r\\x07.safetensors  37" in piped.stdout
    for env in ({}, {"NO_COLOR": "1"}):  # on a terminal rich draws the table: still no markup
        shown = _on_a_terminal("inspect", str(hostile), env=env)
        assert b"[/], LlamaForCausalLM" in shown and b"model-[bold red]x\\x1b[31m" in shown
        assert not re.search(rb"\x1b\[[0-9;]*3[0-9]m", shown)  # no colour: only the keys' bold
    nested = tmp_path / "in[" / "x]"  # an input path holding `[/x]`, printed after the output is complete
    shutil.copytree(hostile, nested)
    out = tmp_path / "out[/x]"
    out.parent.mkdir(exist_ok=True)
    for args in (["--dry-run"], []):
        result = CliRunner().invoke(
            app, ["expand", "--every", "4", "--in", str(nested), "--out", str(out), *args]
        )
        assert result.exit_code == 0, result.stderr
        assert f"{nested} (llama, 8 layers)" in result.stdout
    assert _on_a_terminal("inspect", str(out), env={}).count(b"in[/x]") == 1


def test_control_characters_in_names_reach_the_terminal_escaped(hostile: Path, tmp_path: Path) -> None:
    table = _piped("inspect", str(hostile))
    expanded = _piped("expand", "--every", "4", "--in", str(hostile), "--out", str(tmp_path / "o"))
    assert expanded.returncode == 0, expanded.stderr
    assert "evil\\x1b[2J\\x07.bin" in expanded.stderr  # the "not copied" warning
    missing = _piped("inspect", str(tmp_path / "a\x1b]0;pwned\x07b"))
    assert missing.returncode == 3
    assert missing.stderr.startswith(f"error: {tmp_path}/a\\x1b]0;pwned\\x07b")
    for proc in (table, expanded, missing):
        assert not RAW_CONTROL.search(proc.stdout + proc.stderr), proc.args
    forged = _piped("inspect", str(tmp_path / "x\rerror: forged"))
    assert [line.startswith("error: ") for line in forged.stderr.splitlines()] == [True, False]
    assert "\r" not in forged.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_stdout_is_exit_4_and_keeps_the_finished_output(demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "pro"
    runs = [
        ["inspect", str(demo)],
        ["inspect", str(demo), "--json"],
        ["expand", "--every", "4", "--in", str(demo), "--out", str(out)],
        ["--version"],
        ["--help"],
    ]
    for args in runs:
        with open("/dev/full", "w") as full:
            proc = subprocess.run(
                [sys.executable, "-m", "llamapro_cli", *args], stdout=full, stderr=subprocess.PIPE, text=True
            )
        assert proc.returncode == 4, (args, proc.stderr)
        lines = proc.stderr.splitlines()
        assert lines[-2:][0] == "error: cannot write to stdout: No space left on device", args
        assert lines[-1].startswith("hint: ") and "Traceback" not in proc.stderr
    assert json.loads((out / "llamapro.json").read_text())["num_layers"] == 10  # complete, kept
    assert CliRunner().invoke(app, ["inspect", str(out)]).exit_code == 0


def test_a_reader_that_stops_reading_ends_the_run_quietly(demo: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `llamapro inspect … | head -0`
    proc = subprocess.run(
        [sys.executable, "-m", "llamapro_cli", "inspect", str(demo)], stdout=write_end, stderr=subprocess.PIPE
    )
    os.close(write_end)
    assert (proc.returncode, proc.stderr) == (141, b"")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["expand", "--after", "1," + "9" * 5000], "--after: a 5000-digit number is out of range"),
        (["expand", "--every", "4", "--max-shard-size", "9" * 400], "--max-shard-size: a 400-digit number"),
        (["expand", "--every", "4", "--max-shard-size", "9" * 400 + "GB"], "--max-shard-size: a 400-digit"),
        (
            ["expand", "--every", "4", "--max-shard-size", "1." + "0" * 40 + "1GB"],
            "--max-shard-size: a 41-digit",
        ),
        (["expand", "--every", "9" * 5000], "--every: a 5000-digit number is out of range"),
        (["expand", "--add", "-" + "9" * 30], "--add: a 30-digit number is out of range"),
        (["expand", "--every", "x4"], "--every: 'x4' is not an integer"),
        (["verify-identity", "--seed", "9" * 20], "--seed: a 20-digit number is out of range"),
        (["verify-identity", "--tokens", "9" * 4000], "--tokens: a 4000-digit number is out of range"),
        (["demo-checkpoint", "NEW", "--layers", "9" * 18], "--layers must be 1 to 1024"),
    ],
)
def test_numbers_in_options_are_bounded_usage_errors(
    demo: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    args = [str(tmp_path / "new") if a == "NEW" else a for a in args]
    if args[0] == "expand":
        args += ["--in", str(demo), "--out", str(tmp_path / "o")]
    if args[0] == "verify-identity":
        args += ["--out", str(demo)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith(f"error: {message}") and len(result.stderr) < 300
    assert result.stdout == "" and sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_guide_shows_what_the_demo_prints(tmp_path: Path) -> None:
    page = (ROOT / "docs" / "guide.md").read_text(encoding="utf-8")
    section = page.split("## The same on the demo checkpoint", 1)[1]
    block = re.search(r"```text\n(.*?)```", section, flags=re.S)
    assert block is not None
    work = tmp_path / "work"
    work.mkdir()
    shown = []
    for command in re.findall(r"^\$ llamapro (.+)$", block.group(1), flags=re.M):
        proc = subprocess.run(
            [sys.executable, "-m", "llamapro_cli", *shlex.split(command)],
            cwd=work,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # interleaved as on a terminal: each stream is written unbuffered
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"},
        )
        shown.append(f"$ llamapro {command}\n" + proc.stdout.replace(str(work), "/work"))
    # The disk's, the filesystem's (clone where it shares extents) and the clock's:
    volatile = re.compile(r"^(free space|engine|time) +.*$", flags=re.M)
    assert volatile.sub(r"\1", "".join(shown)) == volatile.sub(r"\1", block.group(1))
