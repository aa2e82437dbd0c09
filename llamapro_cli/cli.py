"""The Typer app: one thin function per command, shared option aliases, `main()`.

Each command parses options, calls one library verb, and hands the report to `output`. Errors: every
`LlamaproError` becomes `error: …` (+ `hint: …`) on stderr and its exit code; anything else is a bug
(exit 101, traceback only with LLAMAPRO_DEBUG=1). Heavy imports (huggingface_hub, torch, transformers)
happen inside the commands so `llamapro --help` stays fast.

Must not: contain surgery logic.
"""

from __future__ import annotations

import functools
import os
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, TypeVar

import typer

from . import __version__
from .errors import Interrupted, LlamaproError

EXIT_CODES = """Exit codes: 0 success; 1 the check ran and failed;
2 usage error (incl. a plan that does not fit); 3 bad or unsupported input;
4 output problem (exists, disk full, permission); 101 internal error; 130/143 SIGINT/SIGTERM."""

app = typer.Typer(
    name="llamapro",
    help="Exact LLaMA Pro block expansion for Hugging Face safetensors checkpoints.\n\n" + EXIT_CODES,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

F = TypeVar("F", bound=Callable[..., Any])

# --- shared option aliases ------------------------------------------------------------------------------
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one JSON document on stdout instead of a table.")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress and no notes on stderr.")]
RevisionOpt = Annotated[
    str | None,
    typer.Option("--revision", help="Hub revision (branch, tag or commit) when CHECKPOINT is a repo id."),
]
CheckpointArg = Annotated[str, typer.Argument(help="A checkpoint folder or a hub repo id (org/name).")]


def handle_errors(func: F) -> F:
    """Map our errors to their exit codes with a one-line message; anything else is exit 101."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from . import output

        try:
            return func(*args, **kwargs)
        except LlamaproError as e:
            output.error(e.message, e.hint)
            raise typer.Exit(e.exit_code) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:
            if os.environ.get("LLAMAPRO_DEBUG"):
                raise
            output.error(
                f"internal error: {type(e).__name__}: {e}", "rerun with LLAMAPRO_DEBUG=1 and report it"
            )
            raise typer.Exit(101) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"llamapro {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Exact LLaMA Pro block expansion for Hugging Face safetensors checkpoints."""


@app.command(
    epilog="Examples:\n\n  llamapro inspect ./llama2-7b\n\n  llamapro inspect ./pro-8b --json | jq .expanded"
)
@handle_errors
def inspect(checkpoint: CheckpointArg, json_: JsonOpt = False, revision: RevisionOpt = None) -> None:
    """What a checkpoint is: architecture, layers, shapes, dtypes, shards, parameters, expansion.

    Reads config.json and the safetensors headers only (never tensor data).
    """
    from . import output
    from .describe import describe_checkpoint

    report = describe_checkpoint(checkpoint, revision=revision)
    if json_:
        output.print_json(report)
    else:
        output.render_inspect(report)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  llamapro expand --every 4 --in ./llama2-7b --out ./pro-8b      (32 -> 40 layers, LLaMA Pro)\n\n"
        "  llamapro expand --every 4 --copies 2 --in ./m --out ./m-exp     (top 2 of each group of 4)\n\n"
        "  llamapro expand --after 3,11 --in ./qwen2.5-7b --out ./q-exp    (copies after layers 3 and 11)\n\n"
        "  llamapro expand --add 8 --placement top --in ./m --out ./m-top  (the paper's ablation)\n\n"
        "  llamapro expand --every 4 --in meta-llama/Llama-2-7b-hf --out ./pro-8b --dry-run"
    )
)
@handle_errors
def expand(
    in_: Annotated[str, typer.Option("--in", help="Input checkpoint folder or hub repo id.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (must not exist unless --force).")],
    every: Annotated[
        int | None, typer.Option(help="After each complete group of N layers, copy the group's top layer(s).")
    ] = None,
    copies: Annotated[
        int | None, typer.Option(help="With --every: copy the top P layers of each group (1 <= P <= N).")
    ] = None,
    after: Annotated[
        str | None, typer.Option(help="Comma-separated layer indices; each gets a copy right after it.")
    ] = None,
    add: Annotated[int | None, typer.Option(help="Add K copies, laid out by --placement.")] = None,
    placement: Annotated[
        str, typer.Option(help="With --add: interleave (paper), top, or bottom (warned).")
    ] = "interleave",
    revision: RevisionOpt = None,
    max_shard_size: Annotated[
        str, typer.Option(help="Largest output shard (e.g. 5GB, 500MB); one file when it all fits.")
    ] = "5GB",
    digests: Annotated[
        bool,
        typer.Option("--digests", help="Record sha256 of every tensor while copying (for verify-frozen)."),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the plan, shard layout, size and free space; write nothing."),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace --out if it is empty or a previous llamapro output.")
    ] = False,
    quiet: QuietOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Insert zeroed copies of decoder layers: the expanded model computes exactly what the input did.

    Streams byte ranges from the input shards (any dtype, memory at the size of the headers) into a
    temporary folder beside --out, renamed into place only when complete. The input is never modified.
    """
    from . import output
    from .expand import expand as run_expand
    from .plan import parse_after

    command = "llamapro " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with output.progress("expand", quiet=quiet or json_) as progress:
        report = run_expand(
            in_,
            out,
            every=every,
            copies=copies,
            after=parse_after(after) if after is not None else None,
            add=add,
            placement=placement,
            revision=revision,
            max_shard_size=max_shard_size,
            digests=digests,
            dry_run=dry_run,
            force=force,
            progress=progress,
            command=command,
        )
    if not quiet:
        for warning in report.warnings:
            output.warn(warning)
        if report.not_copied:
            output.warn("not copied (other weight formats or unknown files): " + ", ".join(report.not_copied))
    if json_:
        output.print_json(report)
    else:
        output.render_expand(report, quiet=quiet)


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def main() -> None:
    """Console-script entry point: explicit SIGINT/SIGTERM handling (130/143, never 'Aborted!')."""
    signal.signal(signal.SIGINT, _raise_interrupted)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        app()
    except Interrupted as e:
        from . import output

        output.error(e.message)
        sys.exit(e.exit_code)


@app.command(
    "demo-checkpoint",
    epilog="Example:\n\n  llamapro demo-checkpoint ./demo-llama && llamapro inspect ./demo-llama",
)
@handle_errors
def demo_checkpoint(
    out: Annotated[Path, typer.Argument(help="Folder to create (must not exist).")],
    layers: Annotated[int, typer.Option(help="Number of decoder layers.")] = 8,
    seed: Annotated[int, typer.Option(help="Random seed for the weights.")] = 0,
) -> None:
    """Write a small Llama checkpoint with seeded random bf16 weights (for demos and trying things out)."""
    from . import output
    from .demo import write_demo_checkpoint
    from .errors import OutputError, UsageError

    if out.exists():
        raise OutputError(f"{out} already exists", hint="choose a new folder")
    if layers < 1:
        raise UsageError("--layers must be at least 1")
    write_demo_checkpoint(out, seed=seed, layers=layers)
    output.note(f"wrote a {layers}-layer demo Llama checkpoint to {out}")
