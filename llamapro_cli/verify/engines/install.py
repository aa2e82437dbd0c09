"""`llamapro engines install ENGINE`: one virtual environment per serving engine, under the user's cache.

Layout of `$XDG_CACHE_HOME/llamapro/engines/<engine>/` (`spec.engine_dir`): `.llamapro-engine` (written
first: this folder is ours), `venv/` (the interpreter `--engine-python` defaults to), `src/` (llama.cpp:
the unpacked `llama-cpp-python` sdist, whose `vendor/llama.cpp/convert_hf_to_gguf.py` and `gguf-py` are
the converter of the very source the engine was built from), `install.log` (everything pip printed), and
`installed.json` (written last, after the adapter has imported the engine: an environment without it is
incomplete and is rebuilt).

Invariant: the user's own environment is never touched (every pip call runs in the new venv); a folder
is only deleted when it carries our marker.
Must not: print (progress goes through `log`); import an engine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from llamapro_cli.errors import OutputError
from llamapro_cli.verify.engines.spec import (
    RECIPES,
    Recipe,
    ServingEngine,
    adapter_path,
    engine_dir,
)

MARKER = ".llamapro-engine"
DONE = "installed.json"
LOG = "install.log"


@dataclass(frozen=True)
class Installed:
    """An engine environment that works: its interpreter and what the engine reports about itself."""

    engine: str
    python: str
    versions: dict[str, str]
    already: bool  # it was there before this call
    seconds: float


def install_engine(
    engine: ServingEngine,
    *,
    force: bool = False,
    base_python: str | None = None,
    log: Callable[[str], None] = lambda _line: None,
) -> Installed:
    """Create (or, with `force`, recreate) the environment of `engine`; `log` gets one line per step."""
    started = time.monotonic()
    root = engine_dir(engine)
    done = read_installed(root)
    if done is not None and not force:
        versions = done.get("versions")
        known = {str(k): str(v) for k, v in versions.items()} if isinstance(versions, dict) else {}
        return Installed(engine.value, str(done["python"]), known, True, 0.0)
    _clear(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text(engine.value + "\n")
    recipe = RECIPES[engine]
    python = root / "venv" / "bin" / "python"
    steps = Steps(root / LOG, log)
    steps.run("create the virtual environment", [base_python or sys.executable, "-m", "venv", root / "venv"])
    pip = [python, "-m", "pip", "--disable-pip-version-check", "install"]
    if recipe.tool_packages:
        steps.run("install the converter's requirements", [*pip, *recipe.tool_packages])
    if recipe.sdist is not None:
        source = _unpack_sdist(recipe, root / "src", python, steps)
        gguf_py = source / "vendor" / "llama.cpp" / "gguf-py"
        if gguf_py.is_dir():
            steps.run("install the sdist's own gguf-py", [*pip, gguf_py])
        steps.run(
            f"build {recipe.sdist} from source (minutes)",
            [*pip, "--verbose", source],  # --verbose: the compiler's output goes to the log
            env=dict(recipe.build_env),
        )
    if recipe.packages:
        steps.run(f"install {' '.join(recipe.packages)}", [*pip, *recipe.packages])
    if recipe.remove:
        uninstall = [python, "-m", "pip", "uninstall", "-y", *recipe.remove]
        steps.run(f"remove {' '.join(recipe.remove)}", uninstall)
    versions = probe_versions(engine, python, steps)
    record = {"engine": engine.value, "python": str(python), "versions": versions, "recipe": _recipe(recipe)}
    (root / DONE).write_text(json.dumps(record, indent=2) + "\n")
    return Installed(engine.value, str(python), versions, False, round(time.monotonic() - started, 1))


def read_installed(root: Path) -> dict[str, object] | None:
    """The `installed.json` of a complete environment, else None."""
    try:
        record = json.loads((root / DONE).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and isinstance(record.get("python"), str)
    return record if ok and Path(record["python"]).exists() else None


def probe_versions(engine: ServingEngine, python: Path, steps: Steps) -> dict[str, str]:
    """The adapter imports the engine and prints its versions: proof the environment works."""
    out = steps.run(f"check that {engine.value} imports", [python, adapter_path(engine), "--versions"])
    try:
        versions = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise OutputError(f"the {engine.value} adapter printed no versions", hint=steps.hint) from None
    return {str(k): str(v) for k, v in versions.items()}


class Steps:
    """Runs the install's commands, appending their output to the log; a failure is an `OutputError`."""

    def __init__(self, log_file: Path, log: Callable[[str], None]) -> None:
        self.log_file, self.log = log_file, log
        self.hint = f"the full output is in {log_file}"

    def run(self, what: str, argv: Sequence[object], env: dict[str, str] | None = None) -> str:
        self.log(what)
        command = [str(a) for a in argv]
        with self.log_file.open("a") as f:
            f.write(f"\n$ {' '.join(command)}\n")
        result = subprocess.run(
            command,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
        )
        with self.log_file.open("a") as f:
            f.write(result.stdout + result.stderr)
        if result.returncode != 0:
            last = _last_line(result.stderr) or _last_line(result.stdout) or f"exit {result.returncode}"
            raise OutputError(f"cannot {what}: {last}", hint=self.hint)
        return result.stdout


def _unpack_sdist(recipe: Recipe, src: Path, python: Path, steps: Steps) -> Path:
    if recipe.sdist is None:
        raise ValueError("this recipe has no sdist")
    src.mkdir(parents=True, exist_ok=True)
    download = [python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", src, recipe.sdist]
    steps.run(f"download the {recipe.sdist} source distribution", download)
    archives = sorted(src.glob("*.tar.gz"))
    if not archives:
        raise OutputError(f"pip downloaded no source archive of {recipe.sdist} into {src}", hint=steps.hint)
    with tarfile.open(archives[0]) as tar:
        tar.extractall(src, filter="data")  # "data": no absolute paths, links out or device files
    archives[0].unlink()
    folders = [p for p in src.iterdir() if p.is_dir()]
    if len(folders) != 1:
        raise OutputError(f"{archives[0].name} did not unpack into one folder", hint=steps.hint)
    return folders[0]


def sdist_source(engine: ServingEngine) -> Path | None:
    """The unpacked sdist of an installed engine (llama.cpp), else None."""
    src = engine_dir(engine) / "src"
    folders = [p for p in src.iterdir() if p.is_dir()] if src.is_dir() else []
    return folders[0] if len(folders) == 1 else None


def _clear(root: Path) -> None:
    if not root.exists():
        return
    if not (root / MARKER).is_file():
        raise OutputError(
            f"{root} exists and is not a llamapro engine environment",
            hint="move it away, or set XDG_CACHE_HOME to use another cache",
        )
    shutil.rmtree(root)


def _recipe(recipe: Recipe) -> dict[str, object]:
    return {
        "packages": list(recipe.packages),
        "tool_packages": list(recipe.tool_packages),
        "sdist": recipe.sdist,
        "build_env": dict(recipe.build_env),
        "removed": list(recipe.remove),
    }


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
