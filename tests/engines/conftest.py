"""Plumbing of the real-engine tests (`make test-engines`): opt-in, the engines' environments, the tiny
checkpoints with a tokenizer, and the table of measured figures printed at the end of the run.

Opt-in: without LLAMAPRO_ENGINE_TESTS=1 every test here is skipped, with the reason, so `make test`
needs no engine. With it, a missing environment is created through `llamapro engines install`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
OPT_IN = "LLAMAPRO_ENGINE_TESTS"
RESULTS_ENV = "LLAMAPRO_ENGINE_RESULTS"  # a file to write the figures table into (markdown)
SKIP_REASON = (
    "engine runs are opt-in: `make test-engines` (creates the vllm/llama.cpp/mlx environments: "
    "~15 min and ~5 GB the first time)"
)
# (family, variant) of tests/tiny_models.py: windows of 4 tokens, 6 layers, vocabulary 128.
TINY = {
    "llama": ("llama", "default"),
    "mistral": ("mistral", "default"),
    "qwen2": ("qwen2", "default"),
    "qwen2-sliding": ("qwen2", "sliding"),
    "qwen3": ("qwen3", "default"),
    "gemma2": ("gemma2", "default"),
    "gemma3": ("gemma3_text", "default"),
}
# vLLM's CPU attention has kernels for head_dim 32 and up (not the suite's 16): every engine gets the
# same wider models.
WIDE = {"hidden_size": 128, "head_dim": 32}
FIGURES: list[dict[str, Any]] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(OPT_IN) == "1":
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def engine_python() -> Callable[[str], Path]:
    """`engine_python("mlx")`: the engine's interpreter, installed through the CLI when missing."""
    from llamapro_cli.verify.engines.install import read_installed
    from llamapro_cli.verify.engines.spec import ServingEngine, default_python, engine_dir

    def get(name: str) -> Path:
        engine = ServingEngine(name)
        if read_installed(engine_dir(engine)) is None:
            done = subprocess.run(
                [sys.executable, "-m", "llamapro_cli", "engines", "install", name],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
            )
            assert done.returncode == 0, f"llamapro engines install {name}: {done.stderr[-2000:]}"
        return default_python(engine)

    return get


@dataclass(frozen=True)
class Pair:
    base: Path
    expanded: Path


@pytest.fixture(scope="session")
def pairs(tmp_path_factory: pytest.TempPathFactory, engine_python: Callable[[str], Path]) -> dict[str, Pair]:
    """Every tiny model (head_dim 32) with a trained SentencePiece tokenizer, expanded `--every 2` (breaking
    Gemma 2's alternation and Gemma 3's period), plus the demo checkpoint (no tokenizer) `--every 4`."""
    import tiny_models

    from llamapro_cli.demo import write_demo_checkpoint
    from llamapro_cli.expand import expand

    tokenizer_python = engine_python("mlx")  # has sentencepiece and tokenizers
    root = tmp_path_factory.mktemp("engines")
    out: dict[str, Pair] = {}
    for name, (family, variant) in TINY.items():
        spec = tiny_models.FAMILIES[family]
        tiny_models.FAMILIES[family] = dataclasses.replace(spec, config={**spec.config, **WIDE})
        try:
            base = tiny_models.build_tiny(family, root / name, variant=variant)
        finally:
            tiny_models.FAMILIES[family] = spec
        subprocess.run(
            [str(tokenizer_python), str(HERE / "make_tokenizer.py"), str(base), "128"],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
        expand(base, root / f"{name}-pro", every=2)
        out[name] = Pair(base, root / f"{name}-pro")
    demo = write_demo_checkpoint(root / "demo", seed=0, layers=8)
    expand(demo, root / "demo-pro", every=4)
    out["demo"] = Pair(demo, root / "demo-pro")
    return out


def record(**figures: Any) -> None:
    FIGURES.append(figures)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "0" if value == 0 else f"{value:.3g}"
    return "-" if value is None else str(value).replace("|", "\\|")  # a Markdown table cell


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    keys = list(dict.fromkeys(k for row in FIGURES for k in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(row.get(k)) for k in keys) + " |" for row in FIGURES]
    terminalreporter.write_sep("-", "serving engines: measured figures")
    for line in lines:
        terminalreporter.write_line(line)
    target = os.environ.get(RESULTS_ENV)
    if target:
        Path(target).write_text("\n".join(lines) + "\n")
        Path(target).with_suffix(".json").write_text(json.dumps(FIGURES, indent=1))


@pytest.fixture
def recorder() -> Iterator[Callable[..., None]]:
    yield record
