"""Launching an adapter script in an engine's own interpreter, and turning its exit into our errors.

`resolve_python` finds the interpreter (`--engine-python`, else the environment `llamapro engines install`
made); `run_adapter` writes the request, runs `PYTHON ADAPTER FOLDER` with no stdin and the output in
`FOLDER/adapter.log`, and reads back which model failed and why. `adapter_env` is the environment the
engine sees: ours without PYTHONPATH/PYTHONHOME (llamapro's packages must not shadow the engine's).

Invariant: a model the engine cannot load or run is an `InputError` (exit 3) quoting the engine's own
reason; any other failure of the adapter quotes the last line it printed.
Must not: import an engine; print.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from llamapro_cli.errors import InputError
from llamapro_cli.verify.engines.install import read_installed
from llamapro_cli.verify.engines.protocol import Job, ProtocolError, read_failure, write_request
from llamapro_cli.verify.engines.spec import ServingEngine, adapter_path, default_python, engine_dir

LOG = "adapter.log"
EXIT_MODEL = 3  # adapter_io.EXIT_MODEL: a model could not be loaded or run
DROPPED_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")


def resolve_python(engine: ServingEngine, python: str | Path | None) -> Path:
    """The interpreter to run `engine` in; missing is exit 3 with the command that creates it."""
    install = f"llamapro engines install {engine.value}"
    if python is not None:
        path = Path(python).expanduser()
        if not path.is_file():
            raise InputError(f"--engine-python {path}: no such interpreter", hint=f"or run `{install}`")
        return path
    path = default_python(engine)
    if read_installed(engine_dir(engine)) is None:
        raise InputError(
            f"no {engine.value} environment at {engine_dir(engine)}",
            hint=f"run `{install}` first, or pass --engine-python PATH",
        )
    return path


def adapter_env(threads: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["HF_HUB_OFFLINE"] = "1"  # the engines read local folders; nothing is fetched
    env.update(extra or {})
    return env


def run_adapter(
    engine: ServingEngine,
    python: Path,
    job: Job,
    folder: Path,
    *,
    env: Mapping[str, str] | None = None,
    adapter: Path | None = None,
) -> None:
    """Run `job` in the engine (the arrays land in `folder`); a failure raises `InputError`."""
    write_request(folder, job)
    command = [str(python), str(adapter or adapter_path(engine)), str(folder)]
    rc = run_logged(command, folder / LOG, env or adapter_env(job.threads))
    names = [name for name, _ in job.models]
    output = (
        f"its output is in {folder / LOG}"
        if os.environ.get("LLAMAPRO_DEBUG")
        else f"rerun with LLAMAPRO_DEBUG=1 to keep its output ({LOG})"
    )
    if rc == EXIT_MODEL:
        try:
            failure = read_failure(folder, names)
        except ProtocolError:
            failure = None
        if failure is not None:
            path = dict(job.models)[failure.name]
            verb = "load" if failure.stage == "load" else "run"
            raise InputError(
                f"{engine.value} cannot {verb} the {failure.name} model {path}: {failure.error}",
                hint=f"the engine refuses this model; {output}",
            )
    if rc != 0:
        raise InputError(
            f"the {engine.value} adapter failed (exit {rc}): {last_line(folder / LOG)}",
            hint=f"{output}; is {python} a {engine.value} environment? "
            f"(`llamapro engines install {engine.value}`)",
        )


def run_logged(command: Sequence[str], log: Path, env: Mapping[str, str]) -> int:
    """Run with no stdin, stdout and stderr appended to `log`; the exit status."""
    with log.open("ab") as out:
        out.write(("$ " + " ".join(command) + "\n").encode())
        out.flush()
        try:
            done = subprocess.run(
                list(command), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=dict(env)
            )
        except OSError as e:  # not executable, wrong format
            raise InputError(f"cannot run {command[0]}: {e.strerror or e}") from None
    return done.returncode


def last_line(log: Path, skip: Sequence[str] = ("$ ",)) -> str:
    """The last meaningful line of a log (tracebacks end with the error itself)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "no output"
    kept = [line.strip() for line in lines if line.strip() and not line.startswith(tuple(skip))]
    return kept[-1][:400] if kept else "no output"
