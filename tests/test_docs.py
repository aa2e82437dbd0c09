"""The documentation and the shell contract: the generated CLI reference is fresh, the MkDocs site builds
in strict mode (broken links, anchors and nav entries fail), every command is documented by hand, the
JSON page lists every report field, the API page's imports work; shell completion, NO_COLOR, --json."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import subprocess
import sys
import typing
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from llamapro_cli.cli.app import app

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
HAND_WRITTEN = [p for p in sorted(DOCS.rglob("*.md")) if p.relative_to(DOCS).parts[0] != "reference"]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_cli_reference", ROOT / "scripts" / "gen_cli_reference.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _commands() -> list[str]:
    group = typer.main.get_command(app)
    return [name for name, cmd in getattr(group, "commands", {}).items() if not getattr(cmd, "hidden", False)]


def test_cli_reference_is_fresh() -> None:
    gen = _generator()
    current = gen.PAGE.read_text(encoding="utf-8") if gen.PAGE.exists() else ""
    assert current == gen.render(), "docs/reference/cli.md is stale: run python scripts/gen_docs.py"
    for name in _commands():
        assert f"\n## llamapro {name}\n" in current


def test_mkdocs_builds_in_strict_mode(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "cli" / "index.html").is_file()


def test_every_command_is_documented_by_hand() -> None:
    text = "\n".join(p.read_text(encoding="utf-8") for p in HAND_WRITTEN)
    missing = [name for name in _commands() if f"llamapro {name}" not in text]
    assert not missing, f"commands no hand-written docs page mentions: {missing}"


# --- JSON documents: every field of every report is listed on docs/json-schemas.md ----------------------


def _reports() -> dict[str, type]:
    from llamapro_cli.describe import InspectReport
    from llamapro_cli.expand import ExpandReport
    from llamapro_cli.freeze.audit import FrozenReport
    from llamapro_cli.freeze.check import CheckReport
    from llamapro_cli.freeze.learning import TrainingReport
    from llamapro_cli.freeze.map import FreezeMap
    from llamapro_cli.hub import PushReport
    from llamapro_cli.merge import MergeReport
    from llamapro_cli.verify.compare import CompareReport
    from llamapro_cli.verify.identity import IdentityReport

    return {
        "llamapro inspect --json": InspectReport,
        "llamapro expand --json": ExpandReport,
        "llamapro push --json": PushReport,
        "llamapro verify-identity --json": IdentityReport,
        "llamapro compare --json": CompareReport,
        "llamapro freeze-map --format json": FreezeMap,
        "llamapro verify-frozen --json": FrozenReport,
        "llamapro verify-frozen --report --json": TrainingReport,
        "llamapro freeze-map --check --json": CheckReport,
        "llamapro merge-adapter --json": MergeReport,
    }


def _fields(cls: type, seen: set[type] | None = None) -> set[str]:
    """Field names of a dataclass and of the dataclasses nested in its field types."""
    seen = seen if seen is not None else set()
    if cls in seen:
        return set()
    seen.add(cls)
    names: set[str] = set()
    for name, hint in typing.get_type_hints(cls).items():
        if name not in {f.name for f in dataclasses.fields(cls)}:
            continue
        names.add(name)
        for nested in _dataclasses_in(hint):
            names |= _fields(nested, seen)
    return names


def _dataclasses_in(hint: Any) -> list[type]:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return [hint]
    return [t for arg in typing.get_args(hint) for t in _dataclasses_in(arg)]


def test_json_schema_page_lists_every_field() -> None:
    page = (DOCS / "json-schemas.md").read_text(encoding="utf-8")
    sections = dict(re.findall(r"^## `([^`]+)`\n(.*?)(?=^## |\Z)", page, flags=re.M | re.S))
    for heading, cls in _reports().items():
        assert heading in sections, f"docs/json-schemas.md has no section ## `{heading}`"
        missing = sorted(f for f in _fields(cls) if f"`{f}`" not in sections[heading])
        assert not missing, f"## `{heading}` does not list {cls.__name__} fields {missing}"


def test_api_page_imports_work() -> None:
    for page in ("api.md", "hub.md"):
        text = (DOCS / page).read_text(encoding="utf-8")
        blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
        imports = [line for b in blocks for line in b.splitlines() if line.startswith("from llamapro_cli")]
        assert imports
        for line in imports:
            exec(line, {})


# --- shell and pipelines ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("shell", "needle"), [("bash", "complete -o default -F"), ("zsh", "compdef")])
def test_completion_script(shell: str, needle: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Typer detects the user's shell; its test switch makes --show-completion take the shell's name.
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    result = CliRunner().invoke(app, ["--show-completion", shell], prog_name="llamapro")
    assert result.exit_code == 0, result.stderr
    assert f"_LLAMAPRO_COMPLETE=complete_{shell}" in result.stdout and needle in result.stdout


@pytest.mark.parametrize(
    ("words", "expected"),
    [("llamapro ex", {"expand"}), ("llamapro expand --push", {"--push-to-hub", "--push-branch"})],
)
def test_completion_answers(words: str, expected: set[str]) -> None:
    env = {
        "_LLAMAPRO_COMPLETE": "complete_bash",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split()) - 1),
    }
    result = CliRunner().invoke(app, [], prog_name="llamapro", env=env)
    assert result.exit_code == 0, result.stderr
    assert set(result.stdout.split()) == expected


def test_every_data_command_has_json() -> None:
    for name in _commands():
        if name in ("demo-checkpoint", "engines"):  # prints nothing on stdout; a group (its install has)
            continue
        help_text = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "100"}).stdout
        assert "--json" in help_text, f"llamapro {name} has no --json"


_COLOUR = re.compile(r"\x1b\[(?:[0-9;]*;)?(?:3[0-9]|9[0-7]|4[0-9]|10[0-7])(?:;[0-9;]*)?m")


def test_no_color_and_plain_pipes(tmp_path: Path) -> None:
    from llamapro_cli.demo import write_demo_checkpoint

    demo = write_demo_checkpoint(tmp_path / "demo", layers=4)
    out = tmp_path / "pro"
    runs = [
        ["inspect", str(demo)],
        ["expand", "--every", "2", "--in", str(demo), "--out", str(out), "-q", "--force"],
    ]
    runs += [["inspect", str(out)], ["inspect", str(tmp_path / "absent")]]
    for args in runs:
        plain = CliRunner().invoke(app, args)  # not a terminal: no escape codes at all
        assert "\x1b" not in plain.stdout + plain.stderr, args
        forced = CliRunner().invoke(app, args, env={"FORCE_COLOR": "1", "NO_COLOR": "1"}, color=True)
        assert not _COLOUR.search(forced.stdout + forced.stderr), args
        assert (plain.exit_code, forced.exit_code) in ((0, 0), (3, 3))
