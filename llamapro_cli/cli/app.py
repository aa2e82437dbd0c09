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

from llamapro_cli.cli import training_cmds
from llamapro_cli.errors import Interrupted, LlamaproError
from llamapro_cli.version import __version__

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
PrivateOpt = Annotated[
    bool, typer.Option("--private", help="Create the hub repo private (an existing repo keeps its setting).")
]
CheckpointArg = Annotated[str, typer.Argument(help="A checkpoint folder or a hub repo id (org/name).")]


def handle_errors(func: F) -> F:
    """Map our errors to their exit codes with a one-line message; anything else is exit 101."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from llamapro_cli.cli import output

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
    epilog=(
        "Examples:\n\n  llamapro inspect ./llama2-7b\n\n  llamapro inspect ./pro-8b --json | jq .expanded\n\n"
        "  llamapro inspect meta-llama/Llama-2-7b-hf     (shard headers over HTTP, no weights downloaded)"
    )
)
@handle_errors
def inspect(checkpoint: CheckpointArg, json_: JsonOpt = False, revision: RevisionOpt = None) -> None:
    """What a checkpoint is: architecture, layers, shapes, dtypes, shards, parameters, expansion.

    Reads config.json and the safetensors headers only (never tensor data). A hub repo id is read over
    HTTP (config.json, llamapro.json and each shard's header; no weights are downloaded), or from the
    local hub cache when HF_HUB_OFFLINE=1 or the hub cannot be reached.
    """
    from llamapro_cli.cli import output
    from llamapro_cli.describe import describe_checkpoint

    report = describe_checkpoint(checkpoint, revision=revision)
    for warning in report.warnings:
        output.warn(warning)
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
        "  llamapro expand --every 4 --in meta-llama/Llama-2-7b-hf --out ./pro-8b --dry-run\n\n"
        "  llamapro expand --every 4 --in ./llama2-7b --out ./pro-8b --push-to-hub me/pro-8b --private"
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
    push_to_hub: Annotated[
        str | None,
        typer.Option(help="After writing --out, upload it to this hub repo (created if missing)."),
    ] = None,
    private: PrivateOpt = False,
    push_branch: Annotated[
        str | None, typer.Option(help="With --push-to-hub: the branch to upload to (created if missing).")
    ] = None,
    quiet: QuietOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Insert zeroed copies of decoder layers: the expanded model computes exactly what the input did.

    Streams byte ranges from the input shards (any dtype, memory at the size of the headers) into a
    temporary folder beside --out, renamed into place only when complete. The input is never modified.
    """
    from llamapro_cli.cli import output
    from llamapro_cli.expand import expand as run_expand
    from llamapro_cli.plan import parse_after

    _check_push_options(push_to_hub, private=private, branch=push_branch, dry_run=dry_run)
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
            hub_repo_id=push_to_hub,
        )
    if not quiet:
        for warning in report.warnings:
            output.warn(warning)
        if report.not_copied:
            output.warn(
                "not copied (other weight formats, unknown files, links out of the folder): "
                + ", ".join(report.not_copied)
            )
    if json_:
        output.print_json(report)
    else:
        output.render_expand(report, quiet=quiet)
    if push_to_hub:
        _push_after_expand(Path(report.out), push_to_hub, private=private, branch=push_branch, quiet=quiet)


@app.command(
    "verify-identity",
    epilog=(
        "Examples:\n\n"
        "  llamapro verify-identity --out ./pro-8b   (base: llamapro.json)\n\n"
        "  llamapro verify-identity --out ./pro-8b --engine native --device cpu\n\n"
        "  llamapro verify-identity --out ./pro-8b --prompt 'def fib(n):' --json\n\n"
        "  llamapro verify-identity --in ./llama2-7b --out ./merged  (other tools)\n\n"
        "Exit codes: 0 identical; 1 different (the first difference is named); 2 usage; 3 cannot\n"
        "check (no base, no consistent layer mapping, no tokenizer, engine or device unavailable)."
    ),
)
@handle_errors
def verify_identity(
    out: Annotated[str, typer.Option("--out", help="The expanded checkpoint: a folder or a hub repo id.")],
    in_: Annotated[
        str | None,
        typer.Option("--in", help="The base checkpoint (default: the source recorded in llamapro.json)."),
    ] = None,
    engine: Annotated[
        str,
        typer.Option(
            help="auto (transformers when installed), transformers, or native (one block at a time)."
        ),
    ] = "auto",
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cuda, or cpu.")] = "auto",
    dtype: Annotated[
        str, typer.Option(help="auto (the checkpoint's dtype), float32, bfloat16 or float16.")
    ] = "auto",
    tokens: Annotated[
        int | None,
        typer.Option(help="Length of the random token sequence (default: 32, or past the sliding window)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random token ids.")] = 0,
    prompt: Annotated[
        str | None, typer.Option(help="Use this text, through the checkpoint's tokenizer, instead.")
    ] = None,
    atol: Annotated[float, typer.Option(help="Largest |Δ logit| accepted (default 0: bit-identical).")] = 0.0,
    quiet: QuietOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Prove the expanded checkpoint computes exactly what its base did.

    First a structural check (no torch, any size): every original tensor byte-identical to the base's,
    every copy identical to its source except the zeroed tensors, which are all zero, and every layer's
    per-layer config (attention type, window) equal to its source's. Then a numerical check on the same
    tokens: a full forward, cached decoding past every sliding window, and greedy decoding, compared
    exactly. Without llamapro.json, --in is required and the layer mapping is inferred from the zeros.
    """
    from llamapro_cli.cli import output
    from llamapro_cli.errors import CheckFailed
    from llamapro_cli.verify.identity import verify_identity as run_verify

    with output.progress("verify-identity", quiet=quiet or json_) as progress:
        report = run_verify(
            out,
            base=in_,
            engine=engine,
            device=device,
            dtype=dtype,
            tokens=tokens,
            seed=seed,
            prompt=prompt,
            atol=atol,
            progress=progress,
        )
    if not quiet:
        for warning in report.warnings:
            output.warn(warning)
    if json_:
        output.print_json(report)
    else:
        output.render_identity(report)
    if report.verdict != "identical":
        structural = report.structural is not None and not report.structural.ok
        raise CheckFailed(
            f"not identical: {report.reason}",
            hint="re-create it with llamapro expand, or pass the right base with --in"
            if structural
            else "the weights and config match but the outputs do not: please report this with --json",
        )


@app.command(
    "freeze-map",
    epilog=(
        "Formats: text (summary), names (one parameter name per line), json (the manifest), regex (one\n"
        "anchored Python regex), axolotl, llama-factory, peft, swift, hf (Python on `model`).\n\n"
        "Examples:\n\n"
        "  llamapro freeze-map ./pro-8b\n\n"
        "  llamapro freeze-map ./pro-8b --format axolotl >> axolotl.yaml\n\n"
        "  llamapro freeze-map ./pro-8b --format json > pro-8b.freeze.json\n\n"
        "  llamapro freeze-map ./pro-8b --format hf --also embeddings,head\n\n"
        "  llamapro freeze-map ./pro-8b --check llama3_freeze_sft.yaml   (your own trainer config)\n\n"
        "Exit codes: 0 ok (--check: the config trains exactly the map); 1 --check found a difference;\n"
        "2 the format cannot express this layout (e.g. llama-factory's stride), an unknown format or\n"
        "role; 3 not an expanded checkpoint, bad input, or a trainer config --check cannot read."
    ),
)
@handle_errors
def freeze_map(
    checkpoint: CheckpointArg,
    format_: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="text, names, json, regex, axolotl, llama-factory, peft, swift or hf.",
        ),
    ] = "text",
    also: Annotated[
        str,
        typer.Option(help="Also train these roles (comma-separated): embeddings, head, final-norm."),
    ] = "",
    json_: Annotated[bool, typer.Option("--json", help="Same as --format json.")] = False,
    revision: RevisionOpt = None,
    check: Annotated[
        Path | None,
        typer.Option(
            metavar="TRAINER_CONFIG",
            help="Check your trainer config (LLaMA-Factory, Axolotl, PEFT adapter_config.json, ms-swift) "
            "against the map: exit 0 if it trains exactly the new layers, 1 with the difference.",
        ),
    ] = None,
) -> None:
    """Which tensors to train after expand (the new layers), as a summary, a manifest or a trainer snippet.

    The new layers come from llamapro.json (or, without it, from layers whose branch-final tensors are
    all zero). Every trainer snippet is checked against that trainer's own matching rule on the
    model's parameter names before it is printed, and carries the resolved counts in a comment.
    """
    from llamapro_cli.cli import output
    from llamapro_cli.errors import UsageError
    from llamapro_cli.freeze.map import freeze_map as build_map
    from llamapro_cli.freeze.trainers import Format, parse_format, render

    fmt = parse_format(format_)
    if check is not None:
        if fmt is not Format.TEXT:
            raise UsageError(f"--check conflicts with --format {fmt.value} (use --json for the report)")
        training_cmds.check_trainer_config(checkpoint, check, also=also, json_=json_, revision=revision)
        return
    if json_ and fmt not in (Format.TEXT, Format.JSON):
        raise UsageError(f"--json conflicts with --format {fmt.value}")
    fm = build_map(checkpoint, also=also.split(",") if also else (), revision=revision)
    if json_ or fmt is Format.JSON:
        output.print_json(fm)
    elif fmt is Format.TEXT:
        output.render_freeze_map(fm)
    else:
        output.render_snippet(render(fm, fmt))


@app.command(
    "verify-frozen",
    epilog=(
        "Examples:\n\n"
        "  llamapro verify-frozen --map ./pro-8b --trained ./run/checkpoint-15900\n\n"
        "  llamapro verify-frozen --map map.json --trained ./run/final --json\n\n"
        "A manifest (freeze-map --format json > map.json) of an expand --digests checkpoint carries\n"
        "the sha256 of every tensor: the expanded folder is then no longer needed.\n\n"
        "Exit codes: 0 every frozen tensor is unchanged; 1 a frozen tensor changed or is missing (each\n"
        "is named); 2 usage; 3 unreadable or mismatched input."
    ),
)
@handle_errors
def verify_frozen(
    map_: Annotated[
        str,
        typer.Option("--map", help="The expanded checkpoint, or a manifest from freeze-map --format json."),
    ],
    trained: Annotated[
        Path,
        typer.Option(help="The trained weights: a folder (index, model.safetensors, *.safetensors) or file."),
    ],
    also: Annotated[
        str,
        typer.Option(help="With a checkpoint --map: roles trained too (embeddings,head,final-norm)."),
    ] = "",
    report_: Annotated[
        bool,
        typer.Option(
            "--report", help="Also measure how far training moved each new layer (and any changed original)."
        ),
    ] = False,
    plot: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE.png", help="Draw that report as a bar chart per new layer (needs matplotlib)."
        ),
    ] = None,
    quiet: QuietOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Prove that training changed only the new layers: every frozen tensor bit-identical.

    Compares against the sha256 digests of expand --digests, or else the expanded checkpoint's bytes,
    whatever the trained checkpoint's sharding; trainer prefixes (base_model.model., _orig_mod.,
    module.) are stripped, and tensors saved in another dtype (fp32 copies of bf16) are converted back
    with an exact round-trip check. New layers that did not change at all are a warning. --report adds,
    per new layer, |W_trained - W_initial| / |W_source| of its copied tensors and the RMS of its
    zero-initialised ones, with a verdict (changed / did not change); --plot FILE.png draws it.
    """
    from llamapro_cli.cli import output
    from llamapro_cli.errors import CheckFailed
    from llamapro_cli.freeze.audit import verify_frozen as run_verify

    if report_ or plot is not None:
        report = training_cmds.verify_frozen_report(
            map_, trained, also=also, quiet=quiet, json_=json_, plot=plot
        )
    else:
        with output.progress("verify-frozen", quiet=quiet or json_) as progress:
            report = run_verify(map_, trained, also=also.split(",") if also else (), progress=progress)
        if json_:
            output.print_json(report)
        else:
            output.render_frozen(report)
    if not report.ok:
        names = [c.name for c in report.changed] + [f"{n} (missing)" for n in report.missing]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise CheckFailed(
            f"frozen tensors changed: {len(report.changed)}, missing: {len(report.missing)}: {shown}",
            hint="the trainer updated (or dropped) tensors outside the new layers: check its freeze settings",
        )


app.command("merge-adapter", epilog=training_cmds.MERGE_EPILOG)(handle_errors(training_cmds.merge_adapter))


def _check_push_options(repo_id: str | None, *, private: bool, branch: str | None, dry_run: bool) -> None:
    """Before any work: push options make sense together, and the push can succeed (repo id, token)."""
    from llamapro_cli.errors import UsageError

    if repo_id is None:
        if private or branch:
            raise UsageError("--private and --push-branch need --push-to-hub REPO_ID")
        return
    if dry_run:
        raise UsageError("--push-to-hub cannot be combined with --dry-run (nothing is written)")
    from llamapro_cli.hub import check_can_push

    check_can_push(repo_id)


def _push_after_expand(folder: Path, repo_id: str, *, private: bool, branch: str | None, quiet: bool) -> None:
    from llamapro_cli.cli import output
    from llamapro_cli.errors import OutputError
    from llamapro_cli.hub import push_folder

    _hub_progress(quiet=quiet)
    try:
        pushed = push_folder(folder, repo_id, private=private or None, branch=branch)
    except OutputError as e:
        retry = f"{folder} is complete; retry with: llamapro push {folder} {repo_id}"
        raise OutputError(e.message, hint=f"{e.hint}; {retry}" if e.hint else retry) from e
    if not quiet:
        output.note(f"pushed {pushed.files} files to {pushed.url}")


def _hub_progress(*, quiet: bool) -> None:
    if quiet:  # huggingface_hub draws its own bars on stderr
        from huggingface_hub.utils import disable_progress_bars  # type: ignore[attr-defined]

        disable_progress_bars()


@app.command(
    epilog=(
        "Examples:\n\n"
        "  llamapro push ./pro-8b me/llama-2-7b-pro --private\n\n"
        "  llamapro push ./pro-8b me/llama-2-7b-pro --branch every-4 --json\n\n"
        "The token is HF_TOKEN or the stored login (hf auth login). Exit codes: 0 uploaded; 2 bad repo id;\n"
        "3 not a finished llamapro output (a .partial-* folder is never uploaded); 4 upload failed."
    )
)
@handle_errors
def push(
    folder: Annotated[Path, typer.Argument(help="A finished llamapro expand output folder.")],
    repo_id: Annotated[str, typer.Argument(help="The hub model repo (org/name), created if missing.")],
    private: PrivateOpt = False,
    branch: Annotated[
        str | None,
        typer.Option("--branch", "--push-branch", help="Upload to this branch (created if missing)."),
    ] = None,
    quiet: QuietOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Upload an expand output folder to the Hugging Face Hub (resumable: rerun to finish).

    Checks the folder first: a complete llamapro output whose config, index and shard headers agree.
    Uses huggingface_hub's folder upload (upload_large_folder where available, else upload_folder).
    """
    from llamapro_cli.cli import output
    from llamapro_cli.hub import push_folder

    _hub_progress(quiet=quiet or json_)
    report = push_folder(folder, repo_id, private=private or None, branch=branch)
    if json_:
        output.print_json(report)
    else:
        output.render_push(report)


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
    from llamapro_cli.cli import output
    from llamapro_cli.demo import write_demo_checkpoint
    from llamapro_cli.errors import OutputError, UsageError

    if out.exists():
        raise OutputError(f"{out} already exists", hint="choose a new folder")
    if layers < 1:
        raise UsageError("--layers must be at least 1")
    write_demo_checkpoint(out, seed=seed, layers=layers)
    output.note(f"wrote a {layers}-layer demo Llama checkpoint to {out}")


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def main() -> None:
    """Console-script entry point: explicit SIGINT/SIGTERM handling (130/143, never 'Aborted!')."""
    signal.signal(signal.SIGINT, _raise_interrupted)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        app()
    except Interrupted as e:
        from llamapro_cli.cli import output

        output.error(e.message)
        sys.exit(e.exit_code)
