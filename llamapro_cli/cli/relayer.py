"""`llamapro relayer` (library twin: `relayer`) and the report of its `ExpandReport`.

Invariant: a thin command: options in, one library call, the report out; the output folder is complete
before anything is printed about it. Exactly one of --layers, --drop, --drop-new (the library says so).
Must not: contain surgery logic, or import torch/transformers (`relayer` never needs them).
"""

from __future__ import annotations

import shlex
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from llamapro_cli.card import human_count
from llamapro_cli.cli import console
from llamapro_cli.cli.console import human_bytes, layer_ranges
from llamapro_cli.cli.expand import engines_text, warn_about_output
from llamapro_cli.cli.options import CommandSpec, JsonOpt, QuietOpt, RevisionOpt

if TYPE_CHECKING:
    from llamapro_cli.expand import ExpandReport

EXAMPLES = (
    "llamapro relayer --layers 0-23,8-31 --in ./mistral-7b --out ./dus    (SOLAR depth up-scaling: 32 -> 48)",
    "llamapro relayer --layers 0-15,8-15,16-31 --in ./m --out ./m-rys     (repeat layers 8-15)",
    "llamapro relayer --drop 20,21 --in ./m --out ./m-pruned              (drop layers 20 and 21)",
    "llamapro relayer --drop-new --in ./pro-8b --out ./base               (undo an expansion)",
    "llamapro relayer --layers 0-3,3z,4-7 --in ./m --out ./m-exp          (a zeroed copy of layer 3)",
)

AFTER = """SPEC lists the output's layers in order: 0-based source layers and ascending ranges,
comma-separated; a z suffix makes a zeroed identity copy (3z, 4-7z); layers left out are dropped.
Per-layer config fields (layer_types, max_window_layers, ...) follow their layers; a map the config
cannot express is refused (exit 2) before anything is written."""


def relayer(
    in_: Annotated[
        str, typer.Option("--in", metavar="CHECKPOINT", help="Input checkpoint folder or hub repo id.")
    ],
    out: Annotated[
        Path, typer.Option("--out", metavar="DIR", help="Output folder (must not exist unless --force).")
    ],
    layers: Annotated[
        str | None,
        typer.Option(metavar="SPEC", help="The output's layers in order, e.g. 0-23,8-31 (z: zeroed copy)."),
    ] = None,
    drop: Annotated[
        str | None,
        typer.Option(metavar="I,J,...", help="Drop these layers (indices or ranges: 10,11 or 10-13)."),
    ] = None,
    drop_new: Annotated[
        bool,
        typer.Option(
            "--drop-new", help="Drop the copies the input's llamapro.json says its expansion added."
        ),
    ] = False,
    revision: RevisionOpt = None,
    max_shard_size: Annotated[
        str,
        typer.Option(
            metavar="SIZE", help="Largest output shard (e.g. 5GB, 500MB); one file when it all fits."
        ),
    ] = "5GB",
    digests: Annotated[
        bool,
        typer.Option("--digests", help="Record sha256 of every tensor while copying (for verify-frozen)."),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the map, shard layout, size and free space; write nothing."),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace --out if it is empty or a previous llamapro output.")
    ] = False,
    quiet: QuietOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Repeat, drop or reorder decoder layers: any layer map, with the config's per-layer fields remapped.

    Depth up-scaling (SOLAR), layer repetition, pruning, and undoing an expansion (--drop-new gives back
    the base byte for byte: its tensors and its config.json). Same engine, atomic output, carried files,
    model card and llamapro.json record as expand; the input is never modified.
    """
    from llamapro_cli.relayer import relayer as run_relayer

    command = "llamapro " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with console.progress("relayer", quiet=quiet or json_) as progress:
        report = run_relayer(
            in_,
            out,
            layers=layers,
            drop=drop,
            drop_new=drop_new,
            revision=revision,
            max_shard_size=max_shard_size,
            digests=digests,
            dry_run=dry_run,
            force=force,
            progress=progress,
            command=command,
        )
    if not quiet:
        warn_about_output(report, max_shard_size)
    if json_:
        console.print_json(report)
    else:
        render_relayer(report, quiet=quiet)


COMMAND = CommandSpec("relayer", relayer, EXAMPLES, after=AFTER)


def render_relayer(report: ExpandReport, *, quiet: bool = False) -> None:
    """The map (compact SPEC, dropped and repeated layers) and what was (or would be) written."""
    verb = "would write" if report.dry_run else "wrote"
    kept = [x.source for x in report.layers if not x.identity]
    counts = Counter(kept)
    dropped = [i for i in range(report.num_layers_in) if i not in counts]
    repeated = sorted(i for i, n in counts.items() if n > 1)
    zeroed = [x.index for x in report.layers if x.identity]
    rows = [
        ("input", f"{report.source} ({report.architecture}, {report.num_layers_in} layers)"),
        ("output", f"{report.out} ({report.num_layers_out} layers)"),
        ("layer map", f"--layers {report.plan.get('spec')}"),
        ("dropped", layer_ranges(dropped) or "-"),
        ("repeated", layer_ranges(repeated) or "-"),
        ("zeroed copies", layer_ranges(zeroed) or "-"),
        ("parameters", f"{human_count(report.parameters_in)} -> {human_count(report.parameters_out)}"),
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
            [(str(x.index), str(x.source), "zeroed copy" if x.identity else "layer") for x in report.layers],
        )
        console.print_table(
            ("shard", "tensors", "size"),
            [(s.name, str(s.tensors), human_bytes(s.bytes)) for s in report.shards],
        )
    elif not quiet:
        identity = not dropped and not repeated and kept == sorted(kept)
        check = "verify-identity --out" if identity and zeroed else f"compare {report.source}"
        console.note(f"next: llamapro {check} {report.out}")
