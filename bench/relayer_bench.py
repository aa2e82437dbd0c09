"""`bench/run.py --suite relayer`: SOLAR depth up-scaling, `llamapro relayer` beside mergekit `passthrough`.

    .venv/bin/python bench/run.py --suite relayer                  # Qwen2.5-0.5B and 7B, 3 runs each
    .venv/bin/python bench/run.py --suite relayer --sizes qwen2-0.5b --runs 1

Each recipe is one layer map run by every tool on the same synthetic checkpoint (bench/synth.py): the 7B
Llama's `0-23,8-31` (32 -> 48 layers, SOLAR's recipe: two copies of the model, the last 8 layers of the
first and the first 8 of the second dropped) and its analogue on the 24-layer Qwen2.5-0.5B shape with the
sliding window on from layer 21 (`0-17,6-23`, 24 -> 36). mergekit gets the same slices (one per range).
A direct-I/O `dd` copy of the input gives the disk's pace.

Timing is bench/measure.py's (cold, `sync` included, peak RSS of the process tree, load average at the
start). Every output is checked twice, independently of llamapro: its tensors (`peers.check_map`: layer
j byte-equal to its source layer) and its per-layer config (`layermaps.check_layer_config`: each layer's
attention as transformers reads config.json, against its source layer's). A tool that exits non-zero is
still timed (mergekit writes the weights before the config), its output checked as far as it got, and,
where it wrote no config.json, the config its code makes (the layer count alone) is checked instead and
reported beside it. Results go to bench/results-relayer.json and the relayer section of
docs/performance.md (between `<!-- bench-relayer:start -->` and `<!-- bench-relayer:end -->`).

Must not: import llamapro (it is run as a command, like its peer).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import layermaps
import measure
import peers
import synth

START, END = "<!-- bench-relayer:start -->", "<!-- bench-relayer:end -->"
RECIPES = {"7b": "0-23,8-31", "qwen2-0.5b": "0-17,6-23"}
TOOLS = ["llamapro-relayer", "mergekit", "dd"]
LABELS = {
    "llamapro-relayer": "**llamapro relayer**",
    "mergekit": "mergekit passthrough (same slices)",
    "dd": "direct-I/O copy of the input (`dd`, the disk's pace)",
}


@dataclass
class Series:
    tool: str
    samples: list[measure.Sample]
    bytes_written: int = 0
    tensors: str = ""  # tensor check of the output ("" for a plain copy)
    layer_config: str = ""  # per-layer config check of the output
    completed_config: str = ""  # where no config.json was written: the check of mergekit's count-only edit
    failure: str = ""  # the last line of a failed run's output
    note: str = ""  # skipped: why


def command(tool: str, src: Path, out: Path, spec: str, work: Path) -> str:
    if tool == "llamapro-relayer":
        return f"{peers.BIN}/llamapro relayer --in {src} --out {out} --layers {spec} --quiet"
    if tool == "mergekit":
        config = work / f"mergekit-{src.name}-{spec.replace(',', '_')}.yml"
        config.write_text(layermaps.mergekit_slices(src, spec, "bfloat16"))
        return f"{peers.mergekit_venv(work)}/bin/mergekit-yaml {config} {out} --quiet"
    return peers.command(tool, src, out, every=1, work=work)


def _check(series: Series, src: Path, out: Path, spec: str) -> None:
    """Fill the output checks once per tool (every run writes the same bytes)."""
    if series.tool == "dd" or series.tensors or not out.is_dir():
        return
    sources = layermaps.spec_sources(spec)
    series.tensors = peers.check_map(src, out, [(s, False) for s in sources])
    series.layer_config = layermaps.check_layer_config(src, out, sources)
    if not (out / "config.json").exists():
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.json").write_text(json.dumps(layermaps.count_only_config(src, len(sources))))
            series.completed_config = layermaps.check_layer_config(src, Path(tmp), sources)


def bench_recipe(name: str, tools: list[str], runs: int, mergekit_note: str, work: Path) -> dict[str, Any]:
    shape, spec = synth.SHAPES[name], RECIPES[name]
    print(f"== {shape.label}: --layers {spec}: generating (or reusing) the input", flush=True)
    src = synth.generate(shape, work / "models")
    input_bytes = measure.logical_size(src)
    out = work / "out"
    series = {t: Series(t, []) for t in tools}
    for run in range(runs):
        for tool in tools[run % len(tools) :] + tools[: run % len(tools)]:  # rotate: alternated order
            s = series[tool]
            measure.remove(out)
            s.note = s.note or measure.skip_reason(tool, input_bytes, mergekit_note, work)
            if s.note:
                continue
            sample = measure.run(command(tool, src, out, spec, work), inputs=[src], out=out)
            s.samples.append(sample)
            s.bytes_written = measure.logical_size(out) if out.exists() else 0
            if not sample.ok:
                s.failure = (sample.log.strip().splitlines() or ["failed"])[-1][:300]
            _check(s, src, out, spec)
            print(
                f"  run {run + 1} {tool:17s} {sample.wall:7.2f} s  {sample.peak_rss / 1e6:8.0f} MB  "
                f"load {sample.load:.1f}  {'ok' if sample.ok else 'FAILED'}  tensors {s.tensors or '-'}  "
                f"per-layer config {s.layer_config or '-'}",
                flush=True,
            )
            measure.remove(out)
    return {
        "name": name,
        "label": shape.label,
        "spec": spec,
        "input_bytes": input_bytes,
        "shards": len(list(src.glob("*.safetensors"))),
        "layers": shape.layers,
        "layers_out": len(layermaps.spec_sources(spec)),
        "runs": runs,
        "series": [asdict(s) for s in series.values()],
    }


def main(sizes: list[str], tools: list[str], runs: int, work: Path, doc: Path | None, results: Path) -> None:
    mergekit_note = peers.setup_mergekit(work) if "mergekit" in tools else ""
    out: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "args": " ".join(sys.argv[1:]),
        "environment": peers.environment(),
        "cache": measure.drop_caches([]),
        "mergekit": peers.mergekit_version(work) if "mergekit" in tools and not mergekit_note else "not run",
        "recipes": [bench_recipe(s, tools, runs, mergekit_note, work) for s in sizes],
    }
    results.write_text(json.dumps(out, indent=1) + "\n")
    if doc is not None:
        write_doc(doc, out)
    print("\n".join(ln for ln in render(out).splitlines() if ln.startswith(("|", "###", "-"))))


# --- the page ----------------------------------------------------------------------------------------


def _row(s: dict[str, Any], dd: float) -> str:
    samples = s["samples"]
    if not samples:
        return f"| {LABELS[s['tool']]} | {s['note']} | | | | | | | | |"
    walls = sorted(x["wall"] for x in samples)
    median = statistics.median(walls)
    loads = [x["load"] for x in samples]
    exits = "0" if all(x["ok"] for x in samples) else "**failed**"
    per_byte = median / s["bytes_written"] / dd if s["bytes_written"] and dd == dd else float("nan")
    cpu = statistics.median(x["user"] + x["system"] for x in samples)
    rss = max(x["peak_rss"] for x in samples)
    return (
        f"| {LABELS[s['tool']]} | {median:.1f} s ({walls[0]:.1f}–{walls[-1]:.1f}) | {exits} "
        f"| {s['bytes_written'] / 1e9:.2f} GB | {f'{per_byte:.2f}' if per_byte == per_byte else '—'} "
        f"| {f'{rss / 1e6:.0f} MB' if rss < 1e9 else f'{rss / 1e9:.1f} GB'} | {cpu:.1f} s "
        f"| {min(loads):.1f}–{max(loads):.1f} "
        f"| {s['tensors'] or '—'} | {s['layer_config'] or '—'} |"
    )


def recipe_table(recipe: dict[str, Any]) -> list[str]:
    by = {s["tool"]: s for s in recipe["series"]}
    dd = by.get("dd")
    dd_pb = (
        statistics.median(x["wall"] for x in dd["samples"]) / dd["bytes_written"]
        if dd and dd["samples"] and dd["bytes_written"]
        else float("nan")
    )
    lines = [
        f"### {recipe['label']}: {recipe['input_bytes'] / 1e9:.2f} GB in {recipe['shards']} shard(s), "
        f"`--layers {recipe['spec']}` ({recipe['layers']} → {recipe['layers_out']} layers)",
        "",
        f"{recipe['runs']} cold run(s) per tool, alternated; the load column is the 1-minute load average at "
        "the start of each tool's runs (2 cores shared with other work).",
        "",
        "| tool | wall, median (min–max) | exit | written (logical) | per byte vs dd | peak RSS "
        "| CPU (user+sys) | load | tensors right | per-layer config right |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(by[t], dd_pb) for t in TOOLS if t in by]
    notes = []
    for t in TOOLS:
        s = by.get(t)
        if s and s["failure"]:
            notes.append(f"{LABELS[t]} exited non-zero: `` {s['failure'].strip()} ``")
        if s and s["completed_config"]:
            notes.append(
                f"{LABELS[t]}, its config completed with the layer count alone (the edit its code makes): "
                f"per-layer config {s['completed_config']}"
            )
    return [*lines, "", *(f"- {n}" for n in notes), ""] if notes else [*lines, ""]


def render(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [
        START,
        "",
        f"Measured {results['date']} by `bench/run.py {results['args']}` on {env['cores']} cores "
        f"({env['cpu']}), {env['memory']}, {env['filesystem']} on {env['device']}, kernel {env['kernel']}; "
        f"page cache dropped before every run ({results['cache']}); mergekit {results['mergekit']}.",
        "",
    ]
    for recipe in sorted(results["recipes"], key=lambda r: -r["input_bytes"]):  # the largest first
        lines += recipe_table(recipe)
    return "\n".join([*lines, END])


def write_doc(doc: Path, results: dict[str, Any]) -> None:
    text = doc.read_text()
    if START not in text:
        text += f"\n## Layer maps: relayer against mergekit\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(head + render(results) + tail)
