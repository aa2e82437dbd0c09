"""The Typer app: the commands in workflow order, the error-to-exit-code mapping, and `main()`.

Each command lives in the module of its group (`inspect`, `expand`, `relayer`, `verify`, `freeze`, `merge`,
`hub`, `demo`) with its examples beside it; this module only assembles them. Errors: every `LlamaproError`
becomes `error: …` (+ `hint: …`) on stderr and its exit code; anything else is a bug (exit 101, traceback only
with LLAMAPRO_DEBUG=1). SIGINT/SIGTERM/SIGHUP exit 130/143/129 with one line, never Typer's "Aborted!". Heavy
imports (huggingface_hub, torch, transformers) happen inside the commands so `llamapro --help` stays fast.

Must not: contain surgery logic; be imported by any library module.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperGroup

from llamapro_cli.cli import console, demo, engines_cmds, expand, freeze, hub, inspect, merge, relayer, verify
from llamapro_cli.cli.options import Command, CommandSpec
from llamapro_cli.errors import Interrupted, LlamaproError, OutputError
from llamapro_cli.version import __version__

EXIT_CODES = """Exit codes: 0 success; 1 the check ran and failed;
2 usage error (incl. a plan that does not fit); 3 bad or unsupported input;
4 output problem (exists, disk full, permission, stdout not writable); 101 internal error;
130/143/129 SIGINT/SIGTERM/SIGHUP; 141 the reader of stdout stopped reading."""

# Workflow order: `llamapro --help` lists them so.
COMMANDS: tuple[CommandSpec, ...] = (
    inspect.COMMAND,
    expand.COMMAND,
    relayer.COMMAND,
    verify.COMMAND,
    engines_cmds.GGUF_PATTERN,
    freeze.FREEZE_MAP,
    freeze.VERIFY_FROZEN,
    merge.COMMAND,
    hub.COMMAND,
    demo.COMMAND,
)


class Group(TyperGroup):
    """The `llamapro` group: an error raised while options are parsed (a closed choice's or a number's
    value) is reported like one raised by the command: one line and its exit code; so is a stdout that
    cannot take `--help`."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().main(*args, **kwargs)
        except console.StdoutClosed as e:
            sys.exit(e.exit_code)
        except LlamaproError as e:
            console.error(e.message, e.hint)
            sys.exit(e.exit_code)
        except OSError as e:  # Typer's own output (--help, a usage screen) could not be written
            failure = console.stdout_error(e)
            if not isinstance(failure, console.StdoutClosed):
                console.error(failure.message, failure.hint)
            sys.exit(failure.exit_code)


app = typer.Typer(
    name="llamapro",
    cls=Group,
    help="Exact LLaMA Pro block expansion for Hugging Face safetensors checkpoints.\n\n" + EXIT_CODES,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(func: F) -> F:
    """Map our errors to their exit codes with a one-line message; anything else is exit 101."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = func(*args, **kwargs)
            console.flush()  # a full or closed stdout is exit 4 here, not a message at interpreter exit
            return result
        except console.StdoutClosed as e:
            raise typer.Exit(e.exit_code) from None
        except LlamaproError as e:
            with contextlib.suppress(OutputError):
                console.flush()  # the report before a failed check; the check's exit code wins
            console.error(e.message, e.hint)
            raise typer.Exit(e.exit_code) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:
            if os.environ.get("LLAMAPRO_DEBUG"):
                raise
            console.error(
                f"internal error: {type(e).__name__}: {e}", "rerun with LLAMAPRO_DEBUG=1 and report it"
            )
            raise typer.Exit(101) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        console.print_line(f"llamapro {__version__}")
        console.flush()
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Exact LLaMA Pro block expansion for Hugging Face safetensors checkpoints."""


for _spec in COMMANDS:
    app.command(_spec.name, cls=Command, epilog=_spec.epilog())(handle_errors(_spec.run))
engines_cmds.register(app, handle_errors)


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def main() -> None:
    """Console-script entry point: explicit SIGINT/SIGTERM/SIGHUP handling (130/143/129, never 'Aborted!')."""
    signal.signal(signal.SIGINT, _raise_interrupted)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGHUP, _raise_interrupted)  # a closed terminal: clean up like SIGTERM
    try:
        app()
    except Interrupted as e:
        console.error(e.message)
        sys.exit(e.exit_code)
