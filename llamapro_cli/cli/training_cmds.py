"""The training half of the CLI: `merge-adapter`, and the bodies of `freeze-map --check` and
`verify-frozen --report/--plot` (the app's commands call these).

Each function parses nothing the library should decide: it calls one library verb, prints its report
(data on stdout, notes on stderr) and turns a failed check into exit 1.

Must not: contain merge, rule or statistics logic; import torch (the library does, lazily).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from llamapro_cli.freeze.audit import FrozenReport
    from llamapro_cli.freeze.check import CheckReport

MERGE_EPILOG = (
    "Examples:\n\n"
    "  llamapro merge-adapter --model ./pro-8b --adapter ./run/adapter --out ./pro-8b-merged\n\n"
    "  llamapro merge-adapter --model ./llama-22l --adapter ./rep-adapter --out ./llama-32l  "
    "(layer_replication)\n\n"
    "Byte-identical to PEFT's merge_and_unload() + save_pretrained for LoRA, rsLoRA and DoRA on linear\n"
    "layers; anything else is refused (exit 3). Exit codes: 0 merged; 2 usage; 3 unreadable or\n"
    "unsupported adapter or model; 4 output problem."
)


def merge_adapter(
    model: Annotated[str, typer.Option("--model", help="The checkpoint the adapter was trained on.")],
    adapter: Annotated[
        Path, typer.Option("--adapter", help="The PEFT adapter folder (adapter_config.json + safetensors).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder (must not exist unless --force).")],
    max_shard_size: Annotated[
        str, typer.Option(help="Largest output shard with layer_replication (otherwise the model's shards).")
    ] = "5GB",
    force: Annotated[
        bool, typer.Option("--force", help="Replace --out if it is empty or a previous llamapro output.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress and no notes on stderr.")] = False,
    json_: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout instead of a table.")
    ] = False,
) -> None:
    """Merge a PEFT LoRA adapter into its checkpoint: a complete model folder, written streaming.

    Untouched tensors are byte-copied; each adapted weight is computed alone, as PEFT computes it.
    PEFT layer_replication adapters (trained on a model with fewer layers) are materialised: every
    replica gets its own merged LoRA and the config its new layer count. llamapro.json, when the model
    has one, gains an "adapter" record (path, sha256 of the adapter's weights).
    """
    from llamapro_cli.cli import output
    from llamapro_cli.merge import merge_adapter as run_merge

    command = "llamapro " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with output.progress("merge-adapter", quiet=quiet or json_) as progress:
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
            output.warn(warning)
    if json_:
        output.print_json(report)
        return
    layers = f"{report.num_layers_in}"
    if report.layer_map is not None:
        layers += f" -> {report.num_layers_out} (layer_replication)"
    kind = "DoRA" if report.use_dora else ("rsLoRA" if report.use_rslora else "LoRA")
    rows = [
        ("model", f"{report.model} ({report.architecture}, {layers} layers)"),
        ("adapter", f"{report.adapter} ({kind}, sha256 {report.adapter_sha256[:12]}…)"),
        ("merged", f"{len(report.merged)} weights{_where(report.merged)}"),
        ("replaced", f"{len(report.replaced)} tensors saved whole{_where(report.replaced)}"),
        ("copied", f"{report.copied} tensors byte for byte"),
        ("out", f"{report.out} ({len(report.shards)} shard(s), {output.human_bytes(report.bytes_written)})"),
        ("provenance", "llamapro.json + adapter record" if report.provenance else "shard metadata only"),
    ]
    output.stdout().print(output.key_value_table(rows))
    if not quiet:
        output.note(
            f"next: llamapro verify-frozen --map {shlex.quote(report.model)} --trained "
            f"{shlex.quote(report.out)}"
        )


def _where(names: tuple[str, ...]) -> str:
    return f" (e.g. {names[0]})" if names else ""


def verify_frozen_report(
    map_: str, trained: Path, *, also: str, quiet: bool, json_: bool, plot: Path | None
) -> FrozenReport:
    """`verify-frozen --report/--plot`: the audit, then what training did; returns the audit."""
    from llamapro_cli.cli import output
    from llamapro_cli.freeze.learning import learning_report
    from llamapro_cli.freeze.learning_view import require_matplotlib, write_plot

    if plot is not None:
        require_matplotlib()  # before minutes of reading, not after
    with output.progress("verify-frozen", quiet=quiet or json_) as progress:
        report = learning_report(map_, trained, also=also.split(",") if also else (), progress=progress)
    if plot is not None:
        write_plot(report.learning, plot)
    if json_:
        output.print_json(report)
    else:
        output.render_frozen(report.audit)
        sys.stdout.write(report.learning.table())
    if plot is not None and not quiet:
        output.note(f"wrote {plot}")
    return report.audit


def check_trainer_config(
    checkpoint: str, config: Path, *, also: str, json_: bool, revision: str | None
) -> None:
    """`freeze-map --check`: the report on stdout; exit 1 (CheckFailed) when the config disagrees."""
    from llamapro_cli.checkpoint import Checkpoint
    from llamapro_cli.cli import output
    from llamapro_cli.errors import CheckFailed
    from llamapro_cli.freeze.check import check_trainer_config as run_check

    ckpt = Checkpoint.open(checkpoint, revision=revision)
    report = run_check(ckpt, config, also=also.split(",") if also else ())
    if json_:
        output.print_json(report)
    else:
        sys.stdout.write(check_table(report))
    if report.unknown_keys:
        output.note(
            f"note: keys not read (they do not choose parameters as far as llamapro knows): "
            f"{', '.join(report.unknown_keys)}"
        )
    if not report.agrees:
        raise CheckFailed(
            f"{config} does not train exactly the new layers ({_first_difference(report)})",
            hint=f"llamapro freeze-map {shlex.quote(checkpoint)} --format FORMAT writes a config that does",
        )


def check_table(report: CheckReport) -> str:
    from llamapro_cli.cli.output import layer_ranges

    what = "adapters on" if report.method == "lora" else "trains"
    rows = [
        ("config", f"{report.config} ({report.trainer}, {report.method})"),
        ("rule", report.rule),
        ("new layers", layer_ranges(report.new_layers)),
        (
            what,
            f"new layers {layer_ranges(report.new_layers_trained)}"
            + (f" (partly: {layer_ranges(report.new_layers_partly)})" if report.new_layers_partly else ""),
        ),
        ("left frozen", f"new layers {layer_ranges(report.new_layers_left_frozen)}"),
        ("original layers", layer_ranges(report.original_layers_trained)),
        ("other tensors", ", ".join(report.other_trained) or "-"),
        ("--also missed", ", ".join(report.roles_left_frozen) or "-"),
        ("matches nothing", "; ".join(report.unmatched) or "-"),
    ]
    if report.refused:
        rows.append(("trainer refuses", report.refused))
    rows.append(("result", "AGREES with the freeze map" if report.agrees else "DIFFERS from the freeze map"))
    width = max(len(k) for k, _ in rows)
    return "".join(f"{k.ljust(width)}  {v}\n" for k, v in rows)


def _first_difference(report: CheckReport) -> str:
    from llamapro_cli.cli.output import layer_ranges

    if report.refused:
        return f"the trainer would refuse it: {report.refused}"
    if report.original_layers_trained:
        return f"it trains original layers {layer_ranges(report.original_layers_trained)}"
    if report.new_layers_left_frozen:
        return f"it leaves new layers {layer_ranges(report.new_layers_left_frozen)} frozen"
    if report.unmatched:
        return f"{report.unmatched[0]} matches no parameter"
    if report.other_trained:
        return f"it also trains {report.other_trained[0]}"
    if report.roles_left_frozen:
        return f"it leaves {report.roles_left_frozen[0]} frozen"
    return f"it trains only part of new layers {layer_ranges(report.new_layers_partly)}"
