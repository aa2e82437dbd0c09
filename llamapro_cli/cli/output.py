"""Everything the CLI shows: stdout data (tables, JSON), stderr messages and progress.

stdout carries data only, so it pipes; warnings, errors, hints and progress go to stderr. JSON documents
are `asdict(report)` plus `schema_version`, so the library, the JSON and the table cannot drift apart.
Progress is a rich bar on a terminal and a plain line every ~10 s otherwise (so CI logs show life).
`NO_COLOR` is honoured by rich; every table reads correctly without colour.

Must not: be imported by library modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

JSON_SCHEMA_VERSION = 1
PROGRESS_INTERVAL_S = 10.0


def _interval() -> float:
    """Seconds between plain progress lines: `LLAMAPRO_PROGRESS_INTERVAL` (a test hook), else 10."""
    try:
        return max(0.0, float(os.environ.get("LLAMAPRO_PROGRESS_INTERVAL") or PROGRESS_INTERVAL_S))
    except ValueError:
        return PROGRESS_INTERVAL_S


def stdout() -> Console:
    return Console(file=sys.stdout, highlight=False, soft_wrap=True)


def stderr() -> Console:
    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def error(message: str, hint: str | None = None) -> None:
    # Plain writes: the error contract is exact text, never wrapped or styled.
    sys.stderr.write(f"error: {message}\n")
    if hint:
        sys.stderr.write(f"hint: {hint}\n")


def warn(message: str) -> None:
    sys.stderr.write(f"warning: {message}\n")


def note(message: str) -> None:
    sys.stderr.write(f"{message}\n")


def to_jsonable(report: Any) -> dict[str, Any]:
    is_instance = dataclasses.is_dataclass(report) and not isinstance(report, type)
    body = dataclasses.asdict(report) if is_instance else dict(report)
    return {"schema_version": JSON_SCHEMA_VERSION, **body}


def print_json(report: Any) -> None:
    sys.stdout.write(json.dumps(to_jsonable(report), indent=2, default=_default) + "\n")


def _default(value: Any) -> Any:
    if hasattr(value, "value"):  # enums
        return value.value
    return str(value)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def key_value_table(rows: Sequence[tuple[str, str]], title: str | None = None) -> Table:
    table = Table(title=title, show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def layer_ranges(indices: Sequence[int]) -> str:
    """[0,1,2,5,7,8] -> '0-2, 5, 7-8'."""
    parts: list[str] = []
    run: list[int] = []
    for i in indices:
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            parts.append(_run(run))
        run = [i]
    if run:
        parts.append(_run(run))
    return ", ".join(parts) if parts else "-"


def _run(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"


@contextlib.contextmanager
def progress(label: str, *, quiet: bool) -> Iterator[Callable[[int, int], None]]:
    """A (done, total) callback: a rich bar on a terminal, plain lines every ~10 s otherwise."""
    if quiet:
        yield lambda done, total: None
        return
    if sys.stderr.isatty():
        with _rich_bar(label) as update:
            yield update
        return
    yield _periodic_lines(label)


@contextlib.contextmanager
def _rich_bar(label: str) -> Iterator[Callable[[int, int], None]]:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=stderr(), transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _periodic_lines(label: str) -> Callable[[int, int], None]:
    start = time.monotonic()
    last = [start]
    interval = _interval()

    def update(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= interval or (done >= total and now - start >= interval):
            last[0] = now
            pct = 100.0 * done / total if total else 100.0
            note(f"{label}: {human_bytes(done)} of {human_bytes(total)} ({pct:.0f}%), {now - start:.0f} s")

    return update


# --- renderers: one per report --------------------------------------------------------------------------


def render_inspect(report: Any) -> None:
    """The human table for `InspectReport`."""
    out = stdout()
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
    out.print(key_value_table(rows))
    if len(report.shards) > 1:
        table = Table("shard", "tensors", "size", box=None, pad_edge=False)
        for shard in report.shards:
            table.add_row(shard.name, str(shard.tensors), human_bytes(shard.bytes))
        out.print(table)


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


def _expanded(expansion: Any) -> str:
    if expansion is None:
        return "no llamapro.json (not expanded by llamapro)"
    pairs = ", ".join(f"{j}<-{s}" for j, s in zip(expansion.new_layers, expansion.sources, strict=True))
    text = (
        f"from {expansion.num_layers_in} layers of {expansion.source} by {expansion.tool} "
        f"({_plan_text(expansion.plan)}); new layers (new<-source): {pairs}"
    )
    if expansion.generations > 1:
        text += f"; {expansion.generations} expansions deep"
    return text


def _plan_text(plan: dict[str, Any]) -> str:
    kind = plan.get("kind")
    if kind == "every":
        return f"--every {plan.get('every')} --copies {plan.get('copies')}"
    if kind == "after":
        return "--after " + ",".join(map(str, plan.get("after") or []))
    return f"--add {plan.get('add')} --placement {plan.get('placement')}"


def render_expand(report: Any, *, quiet: bool = False) -> None:
    """The plan (new index -> source) and what was (or would be) written."""
    out = stdout()
    verb = "would write" if report.dry_run else "wrote"
    new = [layer.index for layer in report.layers if layer.identity]
    rows = [
        ("input", f"{report.source} ({report.architecture}, {report.num_layers_in} layers)"),
        ("output", f"{report.out} ({report.num_layers_out} layers)"),
        ("plan", _plan_text(report.plan)),
        ("new layers", ", ".join(f"{j}<-{s}" for j, s in _pairs(report.layers)) or "-"),
        ("parameters", f"{human_count(report.parameters_in)} -> {human_count(report.parameters_out)}"),
        ("zeroed tensors", str(report.zeroed)),
        (verb, f"{human_bytes(report.total_size)} in {len(report.shards)} shard(s)"),
        ("free space", human_bytes(report.free_space)),
    ]
    if not report.dry_run:
        rows.append(("time", f"{report.seconds:.1f} s"))
    out.print(key_value_table(rows))
    if report.dry_run:
        table = Table("new", "source", "kind", box=None, pad_edge=False)
        for layer in report.layers:
            table.add_row(
                str(layer.index), str(layer.source), "identity copy" if layer.identity else "original"
            )
        out.print(table)
        shards = Table("shard", "tensors", "size", box=None, pad_edge=False)
        for shard in report.shards:
            shards.add_row(shard.name, str(shard.tensors), human_bytes(shard.bytes))
        out.print(shards)
    elif new and not quiet:
        note(f"next: llamapro verify-identity --out {report.out}")


def _pairs(layers: Sequence[Any]) -> list[tuple[int, int]]:
    return [(layer.index, layer.source) for layer in layers if layer.identity]


def render_freeze_map(fm: Any) -> None:
    """The human summary of a `FreezeMap` (`freeze-map --format text`)."""
    total = fm.trainable_numel + fm.frozen_numel
    pct = 100.0 * fm.trainable_numel / total if total else 0.0
    pairs = ", ".join(
        f"{j}<-{s}" for j, s in zip(fm.new_layers, fm.sources or [None] * len(fm.new_layers), strict=True)
    )
    rows = [
        ("checkpoint", f"{fm.checkpoint} ({fm.architecture}, {fm.num_layers} layers)"),
        ("new layers", pairs if fm.sources else layer_ranges(fm.new_layers)),
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
    stdout().print(key_value_table(rows))
    for text in fm.notes:
        note(f"note: {text}")
    note(f"next: llamapro freeze-map {fm.checkpoint} --format axolotl|llama-factory|peft|swift|hf|json")


def render_snippet(snippet: Any) -> None:
    """A trainer snippet: the paste-ready text on stdout, notes on stderr."""
    sys.stdout.write(snippet.text)
    for text in snippet.notes:
        note(f"note: {text}")


def render_frozen(report: Any) -> None:
    """The human report of `verify-frozen`: verdict rows, then each changed or missing frozen tensor."""
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
    verdict = "PASS: every frozen tensor is unchanged" if report.ok else "FAIL"
    rows.append(("result", verdict))
    out = stdout()
    out.print(key_value_table(rows))
    for item in report.changed:
        out.print(f"changed: {item.name} ({item.reason})")
    for name in report.missing:
        out.print(f"missing: {name}")
    for text in report.warnings:
        warn(text)


def _retyped(retyped: Sequence[Any]) -> str:
    """'75 frozen BF16 -> F32 (exact round trip); 18 new-layer BF16 -> F32' (trainers upcast)."""
    pairs: dict[str, int] = {}
    for r in retyped:
        kind = "new-layer" if r.trainable else "frozen"
        exact = " (exact round trip)" if r.exact else " (not representable)" * (not r.trainable)
        key = f"{kind} {r.dtype} -> {r.trained_dtype}{exact}"
        pairs[key] = pairs.get(key, 0) + 1
    return "; ".join(f"{n} {k}" for k, n in pairs.items())


def render_push(report: Any) -> None:
    """What `push` uploaded (`PushReport`)."""
    rows = [
        ("folder", report.folder),
        ("repo", report.repo_id + (f" (branch {report.branch})" if report.branch else "")),
        ("url", report.url),
        ("uploaded", f"{report.files} files, {human_bytes(report.bytes)} ({report.method})"),
    ]
    if report.private is not None:
        rows.append(("private", "yes" if report.private else "no"))
    if report.commit:
        rows.append(("commit", report.commit))
    stdout().print(key_value_table(rows))


def render_identity(report: Any) -> None:
    """The verdict of `verify-identity` (`IdentityReport`) on one unwrapped line, then the figures."""
    verdict = "IDENTICAL" if report.verdict == "identical" else f"DIFFERENT: {report.reason}"
    sys.stdout.write(f"verdict: {verdict}\n")  # plain: greppable, never wrapped
    rows = [
        (
            "expanded",
            f"{report.expanded} ({report.num_layers_out} layers, new {layer_ranges(report.new_layers)})",
        ),
        ("base", f"{report.base} ({report.num_layers_in} layers, {report.architecture})"),
        ("layer mapping", report.mapping),
        ("structure", _structure(report.structural)),
    ]
    if report.engine is None:
        why = (
            "skipped" if report.structural is None or report.structural.ok else "not run (structure differs)"
        )
        rows.append(("numerical check", why))
    else:
        rows += _numbers(report)
    memory = f"RSS {human_bytes(report.peak_rss_bytes)}"
    if report.peak_gpu_bytes is not None:
        memory += f", GPU {human_bytes(report.peak_gpu_bytes)}"
    rows += [("time", f"{report.seconds:.1f} s"), ("peak memory", memory)]
    stdout().print(key_value_table(rows))


def _structure(result: Any) -> str:
    if result is None:
        return "skipped"
    if not result.ok:
        where = f" (layer {result.layer})" if result.layer is not None else ""
        return f"different at {result.tensor}{where}"
    return (
        f"identical: {result.tensors_checked} tensors, {human_bytes(result.bytes_compared)} compared "
        f"({result.seconds:.1f} s)"
    )


def _numbers(report: Any) -> list[tuple[str, str]]:
    seed = f", seed {report.seed}" if report.seed is not None else ""
    rows = [
        ("engine", f"{report.engine} on {report.device}, {report.dtype}"),
        (
            "input",
            f"{report.tokens} {report.input}{seed}: prefill {report.prefill}, then "
            f"{report.decode_steps} cached one-token steps and {report.decode_steps} greedy tokens",
        ),
        (
            "max |Δ logit|",
            f"full {_delta(report.full_max_abs)}, cached {_delta(report.cached_max_abs)} "
            + ("(exact comparison)" if report.atol == 0 else f"(atol {report.atol:g})"),
        ),
        ("greedy tokens", {True: "equal", False: "differ", None: "-"}[report.greedy_tokens_equal]),
    ]
    if report.divergence:
        where = [
            f"{label} {value}"
            for label, value in (
                ("layer", report.first_divergence_layer),
                ("position", report.first_divergence_position),
            )
            if value is not None
        ]
        rows.append(("first divergence", report.divergence + (f" ({', '.join(where)})" if where else "")))
    if report.peak_bytes_loaded is not None:
        rows.append(("weights resident", f"at most {human_bytes(report.peak_bytes_loaded)} at once"))
    return rows


def _delta(value: float | None) -> str:
    return "-" if value is None else ("0" if value == 0 else f"{value:.3g}")
