"""`llamapro merge-adapter` (library twin: `merge_adapter`) and the report of a `MergeReport`.

Invariant: a thin command: which weights are merged, and how, is decided by the library (byte-identical
to PEFT's merge_and_unload); the CLI prints its report (data on stdout, notes on stderr).
Must not: contain merge logic; import torch (the library does, lazily).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from llamapro_cli.cli import console
from llamapro_cli.cli.console import human_bytes
from llamapro_cli.cli.options import CommandSpec, JsonOpt, QuietOpt

if TYPE_CHECKING:
    from llamapro_cli.merge import MergeReport

EXAMPLES = (
    "llamapro merge-adapter --model ./pro-8b --adapter ./run/adapter --out ./pro-8b-merged",
    "llamapro merge-adapter --model ./llama-22l --adapter ./rep-adapter --out ./llama-32l  "
    "(layer_replication)",
)
AFTER_EXAMPLES = (
    "Byte-identical to PEFT's merge_and_unload() + save_pretrained for LoRA, rsLoRA and DoRA on linear\n"
    "layers; anything else is refused (exit 3). Exit codes: 0 merged; 2 usage; 3 unreadable or\n"
    "unsupported adapter or model; 4 output problem."
)


def merge_adapter(
    model: Annotated[
        str,
        typer.Option("--model", metavar="CHECKPOINT", help="The checkpoint the adapter was trained on."),
    ],
    adapter: Annotated[
        Path,
        typer.Option(
            "--adapter", metavar="DIR", help="The PEFT adapter folder (adapter_config.json + safetensors)."
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", metavar="DIR", help="Output folder (must not exist unless --force).")
    ],
    max_shard_size: Annotated[
        str,
        typer.Option(
            metavar="SIZE", help="Largest output shard with layer_replication (otherwise the model's shards)."
        ),
    ] = "5GB",
    force: Annotated[
        bool, typer.Option("--force", help="Replace --out if it is empty or a previous llamapro output.")
    ] = False,
    quiet: QuietOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Merge a PEFT LoRA adapter into its checkpoint: a complete model folder, written streaming.

    Untouched tensors are byte-copied; each adapted weight is computed alone, as PEFT computes it.
    PEFT layer_replication adapters (trained on a model with fewer layers) are materialised: every
    replica gets its own merged LoRA and the config its new layer count. llamapro.json, when the model
    has one, gains an "adapter" record (path, sha256 of the adapter's weights).
    """
    from llamapro_cli.merge import merge_adapter as run_merge

    command = "llamapro " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with console.progress("merge-adapter", quiet=quiet or json_) as progress:
        report = run_merge(
            model,
            adapter,
            out,
            force=force,
            max_shard_size=max_shard_size,
            progress=progress,
            command=command,
        )
    if not quiet:
        for warning in report.warnings:
            console.warn(warning)
    if json_:
        console.print_json(report)
        return
    render_merge(report)
    if not quiet:
        console.note(
            f"next: llamapro verify-frozen --map {shlex.quote(report.model)} --trained "
            f"{shlex.quote(report.out)}"
        )


COMMAND = CommandSpec("merge-adapter", merge_adapter, EXAMPLES, after=AFTER_EXAMPLES)


def render_merge(report: MergeReport) -> None:
    """What was merged, replaced and copied, and where the merged model is."""
    layers = f"{report.num_layers_in}"
    if report.layer_map is not None:
        layers += f" -> {report.num_layers_out} (layer_replication)"
    kind = "DoRA" if report.use_dora else ("rsLoRA" if report.use_rslora else "LoRA")
    rows = [
        ("model", f"{report.model} ({report.architecture}, {layers} layers)"),
        ("adapter", f"{report.adapter} ({kind}, sha256 {report.adapter_sha256[:12]}…)"),
        ("merged", f"{len(report.merged)} weights{_example(report.merged)}"),
        ("replaced", f"{len(report.replaced)} tensors saved whole{_example(report.replaced)}"),
        ("copied", f"{report.copied} tensors byte for byte"),
        ("out", f"{report.out} ({len(report.shards)} shard(s), {human_bytes(report.bytes_written)})"),
        ("provenance", "llamapro.json + adapter record" if report.provenance else "shard metadata only"),
    ]
    console.print_rows(rows)


def _example(names: tuple[str, ...]) -> str:
    return f" (e.g. {names[0]})" if names else ""
