"""`llamapro inspect` (library twin: `describe_checkpoint`) and the table of an `InspectReport`.

Invariant: a thin command: one library call, then its report as a table or JSON.
Must not: read anything itself, or import torch/transformers (`inspect` never needs them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from llamapro_cli.card import human_count
from llamapro_cli.cli import console
from llamapro_cli.cli.console import human_bytes, layer_ranges, new_layer_pairs
from llamapro_cli.cli.options import CheckpointArg, CommandSpec, JsonOpt, RevisionOpt
from llamapro_cli.plan import PlanKind, plan_options

if TYPE_CHECKING:
    from llamapro_cli.describe import Expansion, InspectReport

EXAMPLES = (
    "llamapro inspect ./llama2-7b",
    "llamapro inspect ./pro-8b --json | jq .expanded",
    "llamapro inspect meta-llama/Llama-2-7b-hf     (shard headers over HTTP, no weights downloaded)",
)


def inspect(checkpoint: CheckpointArg, json_: JsonOpt = False, revision: RevisionOpt = None) -> None:
    """What a checkpoint is: architecture, layers, shapes, dtypes, shards, parameters, expansion.

    Reads config.json and the safetensors headers only (never tensor data). A hub repo id is read over
    HTTP (config.json, llamapro.json and each shard's header; no weights are downloaded), or from the
    local hub cache when HF_HUB_OFFLINE=1 or the hub cannot be reached.
    """
    from llamapro_cli.describe import describe_checkpoint

    report = describe_checkpoint(checkpoint, revision=revision)
    for warning in report.warnings:
        console.warn(warning)
    if json_:
        console.print_json(report)
    else:
        render_inspect(report)


COMMAND = CommandSpec("inspect", inspect, EXAMPLES)


def render_inspect(report: InspectReport) -> None:
    """The human table of an `InspectReport`, then its shards when there are several."""
    rows = [
        ("checkpoint", report.repo_id or report.path),
        ("architecture", f"{report.architecture} ({report.model_type}; {', '.join(report.architectures)})"),
        ("layers", f"{report.num_layers} under {report.layer_prefix}"),
        ("hidden size", str(report.hidden_size)),
        ("dtypes", ", ".join(f"{d} ({human_count(n)} params)" for d, n in report.dtypes.items())),
        ("parameters", f"{human_count(report.parameters)} ({report.parameters:,})"),
        ("per layer", _per_layer(report.parameters_per_layer)),
        ("outside layers", human_count(report.parameters_outside_layers)),
        (
            "tensors",
            f"{report.tensors:,} in {len(report.shards)} shard(s), {human_bytes(report.total_bytes)}",
        ),
        ("tied embeddings", "yes" if report.tied_embeddings else "no"),
    ]
    if report.quantization:
        rows.append(("quantization", report.quantization))
    if report.layer_kinds:
        rows.append(("layer kinds", _kinds(report.layer_kinds)))
    rows.append(("expanded", _expanded(report.expanded)))
    console.print_rows(rows)
    if len(report.shards) > 1:
        console.print_table(
            ("shard", "tensors", "size"),
            [(s.name, str(s.tensors), human_bytes(s.bytes)) for s in report.shards],
        )


def _per_layer(values: Sequence[int]) -> str:
    distinct = sorted(set(values))
    if len(distinct) == 1:
        return f"{human_count(distinct[0])} (all layers)"
    return f"{human_count(min(values))} to {human_count(max(values))}"


def _kinds(kinds: Sequence[str]) -> str:
    by_kind: dict[str, list[int]] = {}
    for i, kind in enumerate(kinds):
        by_kind.setdefault(kind, []).append(i)
    return "; ".join(f"{kind}: {layer_ranges(idx)}" for kind, idx in by_kind.items())


def _expanded(expansion: Expansion | None) -> str:
    if expansion is None:
        return "no llamapro.json (not expanded by llamapro)"
    if expansion.plan.get("kind") == PlanKind.LAYERS:  # relayer: any layer map, copies optional
        copies = new_layer_pairs(expansion.new_layers, expansion.sources)
        return (
            f"relayered from {expansion.num_layers_in} layers of {expansion.source} by {expansion.tool} "
            f"({plan_options(expansion.plan)})"
            + (f"; zeroed copies (new<-source): {copies}" if copies else "")
            + (f"; {expansion.generations} generations deep" if expansion.generations > 1 else "")
        )
    text = (
        f"from {expansion.num_layers_in} layers of {expansion.source} by {expansion.tool} "
        f"({plan_options(expansion.plan)}); new layers (new<-source): "
        + new_layer_pairs(expansion.new_layers, expansion.sources)
    )
    if expansion.generations > 1:
        text += f"; {expansion.generations} expansions deep"
    return text
