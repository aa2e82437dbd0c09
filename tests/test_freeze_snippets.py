"""Trainer snippets carry data from files the user may not control (the checkpoint path, names read from
tensor headers or a manifest) into code the user runs. Every format is run or parsed here with hostile
values in every interpolated place, and must read back exactly those values with nothing injected.

No transformers needed: the demo checkpoint, stub models, a fake `peft` module and bash.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

from llamapro_cli.cli.console import to_jsonable
from llamapro_cli.errors import InputError, UsageError
from llamapro_cli.expand import expand
from llamapro_cli.freeze.manifest import load_manifest
from llamapro_cli.freeze.map import FreezeMap, freeze_map
from llamapro_cli.freeze.snippet import Format, Lang, comment, literal, one_line
from llamapro_cli.freeze.trainers import render

# A file name may hold anything but "/" and NUL: line breaks of every convention, quotes, comment
# characters, shell expansions, YAML keys and Python statements, each of which would leave a trace (the
# PWNED file, a key, a statement) if it escaped its string or comment.
PAYLOAD = (
    "pro\nopen('PWNED', 'w').close()\rbase_model: evil\u2028x: 1\x85- y\n"
    "#\"'${HOME}$(touch PWNED)`touch PWNED`\\\x1b[31m\u202e \\"
)
FORMATS = [f for f in Format if f not in (Format.TEXT, Format.JSON)]


@pytest.fixture(scope="module")
def hostile(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo expanded (--every 2: new layers 2 and 5 of 6) in a folder named PAYLOAD."""
    root = tmp_path_factory.mktemp("hostile")
    expand(demo, root / "pro", every=2)
    return (root / "pro").rename(root / PAYLOAD)


class StubParameter:
    def __init__(self) -> None:
        self.requires_grad = True

    def requires_grad_(self, on: bool) -> None:
        self.requires_grad = on


class StubModel:
    """What the hf snippet touches: named_parameters() and parameters()."""

    def __init__(self, names: list[str]) -> None:
        self.params = {n: StubParameter() for n in names}

    def named_parameters(self) -> list[tuple[str, StubParameter]]:
        return list(self.params.items())

    def parameters(self) -> list[StubParameter]:
        return list(self.params.values())


def _statements(text: str) -> list[str]:
    """The top-level statements of a Python snippet, by kind (a statement out of a comment shows here)."""
    return [type(node).__name__ for node in ast.parse(text).body]


def run_python(text: str, cwd: Path, namespace: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(cwd)
    exec(compile(text, "<snippet>", "exec"), namespace)
    assert not (cwd / "PWNED").exists()


def check_hf(fm: FreezeMap, text: str, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _statements(text) == ["Import", "Assign", "For", "Assign", "Assert"]
    model = StubModel([*fm.trainable_parameters, *fm.frozen_parameters])
    run_python(text, cwd, {"model": model}, monkeypatch)
    assert {n for n, p in model.params.items() if p.requires_grad} == set(fm.trainable_parameters)


def check_peft(fm: FreezeMap, text: str, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _statements(text) == ["ImportFrom", "Assign", "Assign"]
    seen: dict[str, Any] = {}
    fake = types.ModuleType("peft")
    fake.LoraConfig = lambda **kw: seen.update(kw) or kw  # type: ignore[attr-defined]
    fake.get_peft_model = lambda model, config: model  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "peft", fake)
    run_python(text, cwd, {"model": None}, monkeypatch)
    assert seen["layers_to_transform"] == list(fm.new_layers)
    pattern = seen["layers_pattern"]
    assert fm.memory_prefix.rstrip(".").endswith(pattern) or pattern.replace("\\", "") in fm.memory_prefix


def check_yaml(fm: FreezeMap, fmt: Format, text: str) -> None:
    doc = yaml.safe_load(text)
    keys = {
        Format.AXOLOTL: {"unfrozen_parameters", "gradient_checkpointing_kwargs"},
        Format.LLAMA_FACTORY: {
            "finetuning_type",
            "freeze_trainable_layers",
            "freeze_trainable_modules",
            "use_llama_pro",
            "use_reentrant_gc",
        },
    }[fmt]
    assert set(doc) == keys, f"injected keys: {set(doc) - keys}"
    if fmt is Format.AXOLOTL:
        assert doc["unfrozen_parameters"] == [f"{fm.memory_prefix}{i}." for i in fm.new_layers]


def check_swift(fm: FreezeMap, text: str, cwd: Path) -> None:
    """Source the snippet in bash with `swift` defined to record its argv: no expansion, exact words."""
    script = 'swift() { printf "%s\\0" "$@" > argv; }\n' + text
    run = subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert not (cwd / "PWNED").exists()
    argv = (cwd / "argv").read_bytes().decode("utf-8", "surrogateescape").split("\0")[:-1]
    prefixes = [f"{fm.memory_prefix}{i}." for i in fm.new_layers]
    assert argv == ["pt", "--model", fm.checkpoint, "--tuner_type", "full", "--freeze_parameters_ratio", "1",
                    "--trainable_parameters", *prefixes]  # fmt: skip


def check(fm: FreezeMap, fmt: Format, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Render `fmt` and prove the snippet does exactly what it says in its own language."""
    text = render(fm, fmt).text
    for line in text.splitlines():  # no comment line holds a break another tool would see
        assert line.isprintable(), repr(line)
    if fmt is Format.NAMES:
        assert text.splitlines() == list(fm.trainable_parameters)
    elif fmt is Format.REGEX:
        assert len(text.splitlines()) == 1
    elif fmt is Format.HF:
        check_hf(fm, text, cwd, monkeypatch)
    elif fmt is Format.PEFT:
        check_peft(fm, text, cwd, monkeypatch)
    elif fmt is Format.SWIFT:
        check_swift(fm, text, cwd)
    else:
        check_yaml(fm, fmt, text)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_hostile_checkpoint_path_stays_data_in_every_snippet(
    hostile: Path, fmt: Format, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fm = freeze_map(hostile)
    assert fm.checkpoint == str(hostile)
    check(fm, fmt, tmp_path, monkeypatch)


def test_a_hostile_path_survives_the_manifest(hostile: Path) -> None:
    fm = freeze_map(hostile)
    doc = json.loads(json.dumps(to_jsonable(fm)))
    assert doc["checkpoint"] == str(hostile) and load_manifest(doc) == fm


def _renamed(fm: FreezeMap, prefix: str) -> FreezeMap:
    """The map as if the model's layers lived under `prefix` in memory (a manifest can say so)."""

    def move(name: str) -> str:
        return prefix + name[len(fm.memory_prefix) :] if name.startswith(fm.memory_prefix) else name

    tensors = {
        k: dataclasses.replace(e, parameter=e.parameter and move(e.parameter)) for k, e in fm.tensors.items()
    }
    return dataclasses.replace(
        fm,
        memory_prefix=prefix,
        tensors=tensors,
        trainable_parameters=tuple(map(move, fm.trainable_parameters)),
        frozen_parameters=tuple(map(move, fm.frozen_parameters)),
    )


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "prefix",
    [
        'model.x"); open("PWNED", "w"); ("#.layers.',
        "model.it's #${HOME}: [a].layers.",
        "model.a\nb: 1.layers.",
    ],
)
def test_hostile_parameter_names_are_refused_or_stay_data(
    hostile: Path, fmt: Format, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Names come from tensor headers or a manifest: a snippet that cannot express one exactly is refused
    (exit 2 or 3); any snippet printed does exactly what it says."""
    fm = _renamed(freeze_map(hostile), prefix)
    try:
        check(fm, fmt, tmp_path, monkeypatch)
    except (UsageError, InputError) as e:
        assert e.message and "\n" not in e.message
        if fmt in (Format.NAMES, Format.REGEX):
            assert "\n" in prefix, "a printable name must not be refused by the name list"


@pytest.mark.parametrize(
    "value",
    ["model.layers.2.", "true", "1.5", "- a", "a: b", "#x", "it's", 'say "hi"', "tab\there", "\u2028", "\x85",
     "a\\", "a\\\\", "${HOME}", "[a, b]", "~", "null", "", "\U0001f600", "\ud800"],
)  # fmt: skip
def test_literals_read_back_exactly(value: str, tmp_path: Path) -> None:
    """The one quoting mechanism: Python (plain and regex), YAML and bash read each value back unchanged."""
    assert ast.literal_eval(literal(Lang.PYTHON, value)) == value
    assert ast.literal_eval(literal(Lang.PYTHON, value, regex=True)) == value
    assert ast.literal_eval(literal(Lang.PYTHON, [value, 3])) == [value, 3]
    if value != "\ud800":  # YAML cannot hold a lone surrogate at all
        assert yaml.safe_load(f"k: {literal(Lang.YAML, value)}")["k"] == value
        assert yaml.safe_load(f"k: {literal(Lang.YAML, [value, 'x'])}")["k"] == [value, "x"]
        script = f"printf '%s\\0' {literal(Lang.SHELL, value)} > out"
        subprocess.run(["bash", "-c", script], cwd=tmp_path, check=True)
        assert (tmp_path / "out").read_bytes().decode("utf-8", "surrogateescape") == value + "\0"


def test_comments_are_one_line_whatever_the_text() -> None:
    text = "a\nb\rc\x85d\u2028e\u2029f\x0bg\x0ch\x1ci\x1b[2Jj\u202ek"
    assert one_line(text) == "a\\nb\\rc\\x85d\\u2028e\\u2029f\\x0bg\\x0ch\\x1ci\\x1b[2Jj\\u202ek"
    for line in comment(text * 20):
        assert line.startswith("# ") and line.isprintable() and len(line.splitlines()) == 1


def test_demo_snippets_keep_their_plain_spelling(demo: Path, tmp_path: Path) -> None:
    """Quoting only where needed: ordinary names stay plain YAML, raw regexes and unquoted shell words."""
    expand(demo, tmp_path / "pro", every=2)
    fm = freeze_map(tmp_path / "pro")
    assert "  - model.layers.2.\n" in render(fm, Format.AXOLOTL).text
    assert 'TRAINABLE = re.compile(r"^(?:model\\.layers\\.(?:2|5)\\..+)$")' in render(fm, Format.HF).text
    assert "--trainable_parameters model.layers.2. model.layers.5.\n" in render(fm, Format.SWIFT).text
    assert 'target_modules=["down_proj", "gate_proj"' in render(fm, Format.PEFT).text
    shutil.rmtree(tmp_path / "pro")
