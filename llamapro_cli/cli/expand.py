"""`llamapro expand` (library twin: `expand`) and the report of an `ExpandReport`.

Invariant: a thin command: options in, one library call (plus the optional push through `cli.hub`),
the report out. The output folder is complete before anything is printed about it.
Must not: contain surgery logic, or import torch/transformers (`expand` never needs them).
"""

from __future__ import annotations

import shlex
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from llamapro_cli.card import human_count
from llamapro_cli.cli import console
from llamapro_cli.cli.console import human_bytes, new_layer_pairs
from llamapro_cli.cli.hub import check_push_options, push_after_expand
from llamapro_cli.cli.options import CommandSpec, JsonOpt, PrivateOpt, QuietOpt, RevisionOpt, choice, integer
from llamapro_cli.plan import Placement, plan_options

if TYPE_CHECKING:
    from llamapro_cli.expand import ExpandReport
    from llamapro_cli.shards import ShardSummary

EXAMPLES = (
    "llamapro expand --every 4 --in ./llama2-7b --out ./pro-8b      (32 -> 40 layers, LLaMA Pro)",
    "llamapro expand --every 4 --copies 2 --in ./m --out ./m-exp     (top 2 of each group of 4)",
    "llamapro expand --after 3,11 --in ./qwen2.5-7b --out ./q-exp    (copies after layers 3 and 11)",
    "llamapro expand --add 8 --placement top --in ./m --out ./m-top  (the paper's ablation)",
    "llamapro expand --every 4 --in meta-llama/Llama-2-7b-hf --out ./pro-8b --dry-run",
    "llamapro expand --every 4 --in ./llama2-7b --out ./pro-8b --push-to-hub me/pro-8b --private",
)


def expand(
    in_: Annotated[
        str, typer.Option("--in", metavar="CHECKPOINT", help="Input checkpoint folder or hub repo id.")
    ],
    out: Annotated[
        Path, typer.Option("--out", metavar="DIR", help="Output folder (must not exist unless --force).")
    ],
    every: Annotated[
        int | None,
        integer("--every", help="After each complete group of N layers, copy the group's top layer(s)."),
    ] = None,
    copies: Annotated[
        int | None,
        integer(
            "--copies", metavar="P", help="With --every: copy the top P layers of each group (1 <= P <= N)."
        ),
    ] = None,
    after: Annotated[
        str | None,
        typer.Option(
            metavar="I,J,...", help="Comma-separated layer indices; each gets a copy right after it."
        ),
    ] = None,
    add: Annotated[
        int | None, integer("--add", metavar="K", help="Add K copies, laid out by --placement.")
    ] = None,
    placement: Annotated[
        Placement,
        choice(Placement, "--placement", help="With --add: interleave (paper), top, or bottom (warned)."),
    ] = Placement.INTERLEAVE,
    layers: Annotated[
        str | None,
        typer.Option(
            metavar="SPEC",
            help="The whole layout as a layer map (0-3,3z,4-7: z marks a copy); identity maps only.",
        ),
    ] = None,
    revision: RevisionOpt = None,
    max_shard_size: Annotated[
        str,
        typer.Option(
            metavar="SIZE",
            help="Largest output shard (e.g. 5GB, 500MB); a shard never mixes two input shards.",
        ),
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
        typer.Option(
            metavar="REPO_ID", help="After writing --out, upload it to this hub repo (created if missing)."
        ),
    ] = None,
    private: PrivateOpt = False,
    push_branch: Annotated[
        str | None,
        typer.Option(
            metavar="BRANCH", help="With --push-to-hub: the branch to upload to (created if missing)."
        ),
    ] = None,
    quiet: QuietOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Insert zeroed copies of decoder layers: the expanded model computes exactly what the input did.

    Streams byte ranges from the input shards (any dtype, memory at the size of the headers) into a
    temporary folder beside --out, renamed into place only when complete. The input is never modified.
    Where input and output share a copy-on-write filesystem (XFS with reflink, btrfs), the input's
    blocks are cloned instead of copied (LLAMAPRO_ENGINE=clone|direct|buffered forces an engine).
    """
    from llamapro_cli.expand import expand as run_expand
    from llamapro_cli.plan import parse_after

    check_push_options(push_to_hub, private=private, branch=push_branch, dry_run=dry_run)
    command = "llamapro " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with console.progress("expand", quiet=quiet or json_) as progress:
        report = run_expand(
            in_,
            out,
            every=every,
            copies=copies,
            after=parse_after(after) if after is not None else None,
            add=add,
            placement=placement,
            layers=layers,
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
        warn_about_output(report, max_shard_size)
    if json_:
        console.print_json(report)
    else:
        render_expand(report, quiet=quiet)
    if push_to_hub:
        push_after_expand(Path(report.out), push_to_hub, private=private, branch=push_branch, quiet=quiet)


COMMAND = CommandSpec("expand", expand, EXAMPLES)


def warn_about_output(report: ExpandReport, max_shard_size: str) -> None:
    """On stderr: the plan's and the run's warnings, what was not carried over, oversized shards
    (expand and relayer write the same kind of output)."""
    for warning in report.warnings:
        console.warn(warning)
    if report.not_copied:
        console.warn(
            "not copied (other weight formats, unknown files, links out of the folder): "
            + ", ".join(report.not_copied)
        )
    oversized = oversized_shards(report, max_shard_size)
    if oversized:
        console.note(f"note: {oversized}")


def oversized_shards(report: ExpandReport, max_shard_size: str) -> str | None:
    """One line when shards exceed --max-shard-size. As in huggingface_hub's split, the limit counts
    tensor bytes (each header comes on top) and a tensor is never split, so one larger than the limit
    gets a shard of its own, bigger than the limit."""
    from llamapro_cli.shards import parse_size

    limit = parse_size(max_shard_size)
    over = [s for s in report.shards if s.bytes > limit]
    if not over:
        return None
    largest = max(over, key=lambda s: s.bytes)
    verb = "would be" if report.dry_run else ("is" if len(over) == 1 else "are")
    if len(over) == 1:
        what = f"{largest.name} ({human_bytes(largest.bytes)}) {verb} over --max-shard-size {max_shard_size}"
    else:
        what = (
            f"{len(over)} shards {verb} over --max-shard-size {max_shard_size} (the largest: "
            f"{largest.name}, {human_bytes(largest.bytes)})"
        )
    why = (
        "a tensor larger than the limit gets a shard of its own (tensors are never split)"
        if all(s.tensors == 1 for s in over)
        else "the limit counts tensor bytes, as in huggingface_hub, and each header comes on top"
    )
    return f"{what}: {why}"


def render_expand(report: ExpandReport, *, quiet: bool = False) -> None:
    """The plan (new index <- source) and what was (or, with --dry-run, would be) written."""
    verb = "would write" if report.dry_run else "wrote"
    copies = [layer for layer in report.layers if layer.identity]
    rows = [
        ("input", f"{report.source} ({report.architecture}, {report.num_layers_in} layers)"),
        ("output", f"{report.out} ({report.num_layers_out} layers)"),
        ("plan", plan_options(report.plan)),
        ("new layers", new_layer_pairs([x.index for x in copies], [x.source for x in copies]) or "-"),
        ("parameters", f"{human_count(report.parameters_in)} -> {human_count(report.parameters_out)}"),
        ("zeroed tensors", str(report.zeroed)),
        (verb, f"{human_bytes(report.total_size)} in {len(report.shards)} shard(s)"),
        ("free space", "unknown" if report.free_space is None else human_bytes(report.free_space)),
    ]
    if not report.dry_run:
        rows.append(("engine", engines_text(report.shards)))
        rows.append(("time", f"{report.seconds:.1f} s"))
    console.print_rows(rows)
    if report.dry_run:
        console.print_table(
            ("new", "source", "kind"),
            [
                (str(x.index), str(x.source), "identity copy" if x.identity else "original")
                for x in report.layers
            ],
        )
        console.print_table(
            ("shard", "tensors", "size"),
            [(s.name, str(s.tensors), human_bytes(s.bytes)) for s in report.shards],
        )
    elif copies and not quiet:
        console.note(f"next: llamapro verify-identity --out {report.out}")


def engines_text(shards: Sequence[ShardSummary]) -> str:
    """Which engine wrote the shards: "clone", or "direct (3 shards), buffered (1 shard)"."""
    counts = Counter(shard.engine for shard in shards)
    if len(counts) == 1:
        return str(next(iter(counts)))
    return ", ".join(f"{name} ({n} shard{'s' if n > 1 else ''})" for name, n in counts.items())
