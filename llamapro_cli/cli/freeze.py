"""`llamapro freeze-map` (library twins: `freeze_map`, `freeze.trainers.render`, and with --check
`check_trainer_config`) and `llamapro verify-frozen` (library twins: `verify_frozen`, and with
--report/--plot `learning_report`), with the renderers of a `FreezeMap`, a trainer `Snippet`, a
`CheckReport`, a `FrozenReport` and a `LearningReport`.

Invariant: thin commands: which tensors are trainable, whether a trainer config trains exactly them,
whether training kept the frozen ones and how far it moved the new ones is decided by the library; the
CLI turns a failed check or audit into exit 1.
Must not: import torch or transformers.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from llamapro_cli.card import human_count
from llamapro_cli.cli import console
from llamapro_cli.cli.console import layer_ranges, new_layer_pairs
from llamapro_cli.cli.options import CheckpointArg, CommandSpec, JsonOpt, QuietOpt, RevisionOpt, choice, roles
from llamapro_cli.freeze.trainers import Format

if TYPE_CHECKING:
    from llamapro_cli.freeze.audit import FrozenReport, Retyped
    from llamapro_cli.freeze.check import CheckReport
    from llamapro_cli.freeze.learning import LearningReport
    from llamapro_cli.freeze.map import FreezeMap
    from llamapro_cli.freeze.trainers import Snippet

MAP_BEFORE_EXAMPLES = (
    "Formats: text (summary), names (one parameter name per line), json (the manifest), regex (one\n"
    "anchored Python regex), axolotl, llama-factory, peft, swift, hf (Python on `model`)."
)
MAP_EXAMPLES = (
    "llamapro freeze-map ./pro-8b",
    "llamapro freeze-map ./pro-8b --format axolotl >> axolotl.yaml",
    "llamapro freeze-map ./pro-8b --format json > pro-8b.freeze.json",
    "llamapro freeze-map ./pro-8b --format hf --also embeddings,head",
    "llamapro freeze-map ./run/checkpoint-500 --map ./pro-8b --format axolotl",
    "llamapro freeze-map ./pro-8b --check llama3_freeze_sft.yaml   (your own trainer config)",
)
MAP_AFTER_EXAMPLES = (
    "Exit codes: 0 ok (--check: the config trains exactly the map); 1 --check found a difference;\n"
    "2 the format cannot express this layout (e.g. llama-factory's stride), an unknown format or\n"
    "role; 3 not an expanded checkpoint, bad input, or a trainer config --check cannot read."
)
FROZEN_EXAMPLES = (
    "llamapro verify-frozen --map ./pro-8b --trained ./run/checkpoint-15900",
    "llamapro verify-frozen --map map.json --trained ./run/final --json",
)
FROZEN_AFTER_EXAMPLES = (
    "A manifest (freeze-map --format json > map.json) of an expand --digests checkpoint carries\n"
    "the sha256 of every tensor: the expanded folder is then no longer needed.\n\n"
    "Exit codes: 0 every frozen tensor is unchanged; 1 a frozen tensor changed or is missing (each\n"
    "is named); 2 usage; 3 unreadable or mismatched input."
)


def freeze_map(
    checkpoint: CheckpointArg,
    format_: Annotated[
        Format,
        choice(
            Format,
            "--format",
            "-f",
            help="text, names, json, regex, axolotl, llama-factory, peft, swift or hf.",
        ),
    ] = Format.TEXT,
    also: Annotated[
        str,
        typer.Option(
            metavar="ROLES", help="Also train these roles (comma-separated): embeddings, head, final-norm."
        ),
    ] = "",
    json_: Annotated[bool, typer.Option("--json", help="Same as --format json.")] = False,
    map_: Annotated[
        str | None,
        typer.Option(
            "--map",
            metavar="EXPANDED",
            help="For a trainer's saved checkpoint (no llamapro.json): the expanded checkpoint it was "
            "trained from, or its manifest; the new layers are taken from it.",
        ),
    ] = None,
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

    The new layers come from llamapro.json, checked against the weights (or, without it, from layers
    whose branch-final tensors are all zero, or from --map). Every trainer snippet is checked against
    that trainer's own matching rule on the model's parameter names before it is printed, and carries
    the resolved counts in a comment.
    """
    from llamapro_cli.errors import UsageError
    from llamapro_cli.freeze.apply import freeze_map_from
    from llamapro_cli.freeze.map import freeze_map as build_map
    from llamapro_cli.freeze.trainers import render, usable_formats

    if check is not None and format_ is not Format.TEXT:
        raise UsageError(f"--check conflicts with --format {format_.value} (use --json for the report)")
    if json_ and format_ not in (Format.TEXT, Format.JSON):
        raise UsageError(f"--json conflicts with --format {format_.value}")
    if map_ is None:
        fm = build_map(checkpoint, also=roles(also), revision=revision)
    else:
        fm = freeze_map_from(checkpoint, map_, also=roles(also), revision=revision)
    if check is not None:
        check_config(fm, check, map_=map_, json_=json_)
    elif json_ or format_ is Format.JSON:
        console.print_json(fm)
    elif format_ is Format.TEXT:
        render_freeze_map(fm, usable_formats(fm))
    else:
        render_snippet(render(fm, format_))


FREEZE_MAP = CommandSpec(
    "freeze-map", freeze_map, MAP_EXAMPLES, before=MAP_BEFORE_EXAMPLES, after=MAP_AFTER_EXAMPLES
)


def render_freeze_map(fm: FreezeMap, usable: Sequence[Format]) -> None:
    """The human summary of a `FreezeMap` (`freeze-map --format text`), then what to run next: the
    trainer formats in `usable` (those that can express this map, decided by the library)."""
    total = fm.trainable_numel + fm.frozen_numel
    pct = 100.0 * fm.trainable_numel / total if total else 0.0
    rows = [
        ("checkpoint", f"{fm.checkpoint} ({fm.architecture}, {fm.num_layers} layers)"),
        (
            "new layers",
            new_layer_pairs(fm.new_layers, fm.sources) if fm.sources else layer_ranges(fm.new_layers),
        ),
        ("found by", fm.found_by),
        ("also trainable", ", ".join(fm.also) or "-"),
        (
            "trainable",
            f"{len(fm.trainable_parameters)} parameters in memory ({fm.trainable_tensors} checkpoint "
            f"tensors), {human_count(fm.trainable_numel)} values ({pct:.2f}%)",
        ),
        (
            "frozen",
            f"{len(fm.frozen_parameters)} parameters in memory ({fm.frozen_tensors} checkpoint tensors), "
            f"{human_count(fm.frozen_numel)} values",
        ),
        (
            "layer prefix",
            fm.layer_prefix
            + ("" if fm.memory_prefix == fm.layer_prefix else f" (in memory: {fm.memory_prefix})"),
        ),
        ("tied embeddings", "yes" if fm.tied_embeddings else "no"),
        ("digests", fm.digest_algorithm or "none (verify-frozen compares with the expanded checkpoint)"),
    ]
    console.print_rows(rows)
    for text in fm.notes:
        console.note(f"note: {text}")
    first, *others = [*(f.value for f in usable), "json"]  # pasteable: no a|b|c for the shell
    more = f"  (or {', '.join(others)})" if others else ""
    console.note(f"next: llamapro freeze-map {shlex.quote(fm.checkpoint)} --format {first}{more}")


def render_snippet(snippet: Snippet) -> None:
    """A trainer snippet: the paste-ready text on stdout, notes on stderr."""
    console.print_text(snippet.text)
    for text in snippet.notes:
        console.note(f"note: {text}")


def check_config(fm: FreezeMap, config: Path, *, map_: str | None, json_: bool) -> None:
    """`freeze-map --check`: the report on stdout; exit 1 (CheckFailed) when the config disagrees."""
    from llamapro_cli.errors import CheckFailed
    from llamapro_cli.freeze.check import check_trainer_config

    report = check_trainer_config(fm, config)
    if json_:
        console.print_json(report)
    else:
        render_check(report)
    if report.unknown_keys:
        console.note(
            "note: keys not read (they do not choose parameters as far as llamapro knows): "
            + ", ".join(report.unknown_keys)
        )
    if not report.agrees:
        source = "" if map_ is None else f" --map {shlex.quote(map_)}"
        raise CheckFailed(
            f"{config} does not train exactly the new layers ({_first_difference(report)})",
            hint=f"llamapro freeze-map {shlex.quote(fm.checkpoint)}{source} --format FORMAT writes a "
            "config that does",
        )


def render_check(report: CheckReport) -> None:
    """Which layers and tensors the trainer config trains, beside the map's new layers, then the verdict."""
    what = "adapters on" if report.method == "lora" else "trains"
    partly = f" (partly: {layer_ranges(report.new_layers_partly)})" if report.new_layers_partly else ""
    rows = [
        ("config", f"{report.config} ({report.trainer}, {report.method})"),
        ("rule", report.rule),
        ("new layers", layer_ranges(report.new_layers)),
        (what, f"new layers {layer_ranges(report.new_layers_trained)}{partly}"),
        ("left frozen", f"new layers {layer_ranges(report.new_layers_left_frozen)}"),
        ("original layers", layer_ranges(report.original_layers_trained)),
        ("other tensors", ", ".join(report.other_trained) or "-"),
        ("--also missed", ", ".join(report.roles_left_frozen) or "-"),
        ("matches nothing", "; ".join(report.unmatched) or "-"),
    ]
    if report.refused:
        rows.append(("trainer refuses", report.refused))
    rows.append(("result", "AGREES with the freeze map" if report.agrees else "DIFFERS from the freeze map"))
    console.print_rows(rows)


def _first_difference(report: CheckReport) -> str:
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


def verify_frozen(
    map_: Annotated[
        str,
        typer.Option(
            "--map",
            metavar="MANIFEST_OR_EXPANDED",
            help="The expanded checkpoint, or a manifest from freeze-map --format json.",
        ),
    ],
    trained: Annotated[
        Path,
        typer.Option(
            metavar="TRAINED",
            help="The trained weights: a folder (index, model.safetensors, *.safetensors) or file.",
        ),
    ],
    also: Annotated[
        str,
        typer.Option(
            metavar="ROLES", help="With a checkpoint --map: roles trained too (embeddings,head,final-norm)."
        ),
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
    from llamapro_cli.errors import CheckFailed
    from llamapro_cli.freeze.audit import verify_frozen as run_verify

    if report_ or plot is not None:
        report = verify_frozen_report(map_, trained, also=also, quiet=quiet, json_=json_, plot=plot)
    else:
        with console.progress("verify-frozen", quiet=quiet or json_) as progress:
            report = run_verify(map_, trained, also=roles(also), progress=progress)
        if json_:
            console.print_json(report)
        else:
            render_frozen(report)
    if not report.ok:
        names = [c.name for c in report.changed] + [f"{n} (missing)" for n in report.missing]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise CheckFailed(
            f"frozen tensors changed: {len(report.changed)}, missing: {len(report.missing)}: {shown}",
            hint="the trainer updated (or dropped) tensors outside the new layers: check its freeze settings",
        )


VERIFY_FROZEN = CommandSpec("verify-frozen", verify_frozen, FROZEN_EXAMPLES, after=FROZEN_AFTER_EXAMPLES)


def verify_frozen_report(
    map_: str, trained: Path, *, also: str, quiet: bool, json_: bool, plot: Path | None
) -> FrozenReport:
    """`verify-frozen --report/--plot`: the audit, then what training did; returns the audit."""
    from llamapro_cli.freeze.learning import learning_report
    from llamapro_cli.freeze.learning_view import require_matplotlib, write_plot

    if plot is not None:
        require_matplotlib()  # before minutes of reading, not after
    with console.progress("verify-frozen", quiet=quiet or json_) as progress:
        report = learning_report(map_, trained, also=roles(also), progress=progress)
    if plot is not None:
        write_plot(report.learning, plot)
    if json_:
        console.print_json(report)
    else:
        render_frozen(report.audit)
        render_learning(report.learning)
    if plot is not None and not quiet:
        console.note(f"wrote {plot}")
    return report.audit


def render_frozen(report: FrozenReport) -> None:
    """The verdict rows, then each changed or missing frozen tensor on its own line."""
    frozen = (
        f"{report.frozen_checked} compared: {report.frozen_unchanged} unchanged, {len(report.changed)} "
        f"changed, {len(report.missing)} missing"
    )
    trainable = (
        f"{report.trainable_checked} tensors of layers {layer_ranges(report.new_layers)}: "
        f"{report.trainable_changed} changed"
        + (f", {len(report.trainable_missing)} missing" if report.trainable_missing else "")
    )
    rows = [
        ("map", report.map),
        ("trained", f"{report.trained} ({report.trained_files} file(s))"),
        ("compared with", report.reference),
        ("frozen", frozen),
        ("new layers", trainable),
    ]
    if report.stripped_prefixes:
        rows.append(("name prefixes", "stripped " + ", ".join(report.stripped_prefixes)))
    if report.retyped:
        rows.append(("dtype changes", _retyped(report.retyped)))
    if report.extra:
        rows.append(("not in the map", f"{len(report.extra)} tensors (e.g. {report.extra[0]})"))
    rows.append(("result", "PASS: every frozen tensor is unchanged" if report.ok else "FAIL"))
    console.print_rows(rows)
    for item in report.changed:
        console.print_line(f"changed: {item.name} ({item.reason})")
    for name in report.missing:
        console.print_line(f"missing: {name}")
    for text in report.warnings:
        console.warn(text)


def _retyped(retyped: Sequence[Retyped]) -> str:
    """'75 frozen BF16 -> F32 (exact round trip); 18 new-layer BF16 -> F32' (trainers upcast)."""
    pairs: dict[str, int] = {}
    for r in retyped:
        kind = "new-layer" if r.trainable else "frozen"
        exact = " (exact round trip)" if r.exact else " (not representable)" * (not r.trainable)
        key = f"{kind} {r.dtype} -> {r.trained_dtype}{exact}"
        pairs[key] = pairs.get(key, 0) + 1
    return "; ".join(f"{n} {k}" for k, n in pairs.items())


def render_learning(report: LearningReport) -> None:
    """What training did: a table of the new layers, then the tensors outside them that moved."""
    from llamapro_cli.freeze.learning_view import HEADER, others, preamble, rows

    for line in preamble(report):
        console.print_line(line)
    console.print_line("")
    console.print_table(HEADER, rows(report))
    moved = others(report)
    if moved:
        console.print_line("")
        console.print_line("outside the new layers:")
        for line in moved:
            console.print_line(f"  {line}")
