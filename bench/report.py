"""Render benchmark results: the generated part of docs/performance.md and the plot in docs/img/.

Only the text between `<!-- bench:start -->` and `<!-- bench:end -->` (and, for `--fs` runs, between
`<!-- bench-fs:start -->` and `<!-- bench-fs:end -->`) is replaced, so the hand-written analysis
around it stays. Results are read from bench/results.json (written by run.py), so the page and
the plot can be re-rendered without re-running anything: `python bench/run.py --render-only`.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
FS_START, FS_END = "<!-- bench-fs:start -->", "<!-- bench-fs:end -->"
FS_ORDER = ["llamapro", "llamapro-direct", "llamapro-digests", "cp-reflink", "cp", "dd", "read", "mergekit"]
ORDER = ["llamapro", "llamapro-digests", "llamapro-buffered", "dd", "cp", "mergekit"]
LABELS = {
    "llamapro": "**llamapro expand**",
    "llamapro-digests": "llamapro expand --digests",
    "llamapro-buffered": "llamapro, buffered engine (before)",
    "dd": "direct-I/O copy (`dd bs=64M iflag=direct oflag=direct`)",
    "cp": "`cp -r` of the input",
    "mergekit": "mergekit passthrough (zero `scale`)",
    "llamapro-direct": "llamapro expand, direct engine forced",
    "cp-reflink": "`cp -r --reflink=always` of the input (the floor)",
    "read": "direct-I/O read of the input (`dd iflag=direct`)",
}


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB" if n < 1e9 else f"{n / 1e9:.1f} GB"


def per_byte(series: dict[str, Any]) -> float:
    walls = [s["wall"] for s in series["samples"] if s["ok"]]
    return statistics.median(walls) / series["bytes_written"] if walls and series["bytes_written"] else 0.0


def _row(series: dict[str, Any], cp: float, dd: float) -> str:
    walls = sorted(s["wall"] for s in series["samples"] if s["ok"])
    if not walls:
        return f"| {LABELS[series['tool']]} | failed or skipped: {series['note']} | | | | | | | |"
    median, pb = statistics.median(walls), per_byte(series)
    cpu = statistics.median(s["user"] + s["system"] for s in series["samples"] if s["ok"])
    rss = max(s["peak_rss"] for s in series["samples"] if s["ok"])
    return (
        f"| {LABELS[series['tool']]} | {median:.1f} s ({walls[0]:.1f}–{walls[-1]:.1f}) | "
        f"{_gb(series['bytes_written'])} | {series['bytes_written'] / median / 1e6:.0f} MB/s | "
        f"{pb / cp:.2f} | {pb / dd:.2f} | {_mb(rss)} | {cpu:.1f} s | {series['correct'] or '—'} |"
    )


def size_table(size: dict[str, Any]) -> list[str]:
    by_tool = {s["tool"]: s for s in size["series"]}
    cp = per_byte(by_tool["cp"]) if "cp" in by_tool else float("nan")
    dd = per_byte(by_tool["dd"]) if "dd" in by_tool else float("nan")
    loads = [x["load"] for s in size["series"] for x in s["samples"]]
    lines = [
        f"### {size['label']}: {_gb(size['input_bytes'])} in {size['shards']} shard(s), "
        f"`--every {size['every']}` ({size['layers']} → {size['layers_out']} layers)",
        "",
        f"{size['runs']} cold runs per tool, alternated; 1-minute load average at the start of the runs "
        f"{min(loads):.1f}–{max(loads):.1f} (2 cores shared with other work).",
        "",
        "| tool | wall, median (min–max) | written (logical) | throughput | per byte vs cp | per byte vs dd "
        "| peak RSS | CPU (user+sys) | output correct |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(by_tool[t], cp, dd) for t in ORDER if t in by_tool]
    notes = [f"{LABELS[t]}: {by_tool[t]['note']}" for t in ORDER if t in by_tool and by_tool[t]["note"]]
    return [*lines, "", *(f"- {n}" for n in notes), ""] if notes else [*lines, ""]


def quick_table(quick: dict[str, Any]) -> list[str]:
    lines = [
        "| command | warm, median of 5 (min–max) | cold (page cache dropped) | goal |",
        "|---|---|---|---|",
    ]
    for name, item in quick.items():
        walls = sorted(item["warm"])
        cold = f"{item['cold']:.2f} s" if item.get("cold") is not None else "—"
        lines.append(
            f"| `{name}` | {statistics.median(walls):.2f} s ({walls[0]:.2f}–{walls[-1]:.2f}) | {cold} "
            f"| {item['goal']} |"
        )
    return [*lines, ""]


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def targets(results: dict[str, Any]) -> list[str]:
    """design.md §5's goal column against the largest size measured."""
    size = results["sizes"][-1]
    by = {s["tool"]: s for s in size["series"] if any(x["ok"] for x in s["samples"])}
    lines = [
        f"### Targets (design §5 goals, {size['label']})",
        "",
        "| figure | goal | measured | holds |",
        "|---|---|---|---|",
    ]
    if {"llamapro", "dd"} <= set(by):
        ratio = per_byte(by["llamapro"]) / per_byte(by["dd"])
        lines.append(
            f"| expand, time per byte written | ≤ 1.1 × direct-I/O copy | {ratio:.2f} × "
            f"| {_yes(ratio <= 1.1)} |"
        )
    if {"llamapro", "mergekit"} <= set(by):
        ratio = per_byte(by["llamapro"]) / per_byte(by["mergekit"])
        lines.append(
            f"| expand vs mergekit, per byte | faster | {ratio:.2f} × mergekit's time | {_yes(ratio < 1)} |"
        )
    if "llamapro" in by:
        rss = max(
            max(x["peak_rss"] for x in s["samples"] if x["ok"])
            for z in results["sizes"]
            for s in z["series"]
            if s["tool"] == "llamapro" and any(x["ok"] for x in s["samples"])
        )
        lines.append(
            f"| expand peak RSS, every size | ≤ 100 MB + per-tensor allowance | {_mb(rss)} "
            f"| {_yes(rss <= 101e6)} |"
        )
    if {"llamapro-digests", "cp"} <= set(by):
        ratio = per_byte(by["llamapro-digests"]) / per_byte(by["cp"])
        lines.append(f"| expand --digests, per byte | ≤ 1.3 × cp -r | {ratio:.2f} × | {_yes(ratio <= 1.3)} |")
    for name, item in results.get("quick", {}).items():
        warm = statistics.median(item["warm"])
        lines.append(
            f"| `{name}` | < 0.3 s | {warm:.2f} s warm, {item['cold']:.2f} s cold | "
            f"{_yes(warm < 0.3)} warm, {_yes(item['cold'] < 0.3)} cold |"
        )
    return [*lines, ""]


def render(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [
        START,
        "",
        f"Measured {results['date']} by `make bench` (`bench/run.py {results['args']}`) on "
        f"{env['cores']} cores ({env['cpu']}), {env['memory']}, {env['filesystem']} on {env['device']}, "
        f"kernel {env['kernel']}; page cache dropped before every run ({results['cache']}); "
        f"mergekit {results.get('mergekit', 'not run')}.",
        "",
        "![time and peak memory against model size](img/bench.png)",
        "",
    ]
    for size in results["sizes"]:
        lines += size_table(size)
    if results.get("quick"):
        lines += ["### Start-up and header-only commands", "", *quick_table(results["quick"])]
    lines += targets(results)
    return "\n".join([*lines, END])


def write_doc(doc: Path, results: dict[str, Any]) -> None:
    text = doc.read_text() if doc.exists() else f"# Performance\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(head + render(results) + tail)


def plot(results: dict[str, Any], png: Path) -> bool:
    """Time per run and peak RSS against input size, one line per tool; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for tool in ORDER:
        points = []
        for size in results["sizes"]:
            series = next((s for s in size["series"] if s["tool"] == tool), None)
            ok = [s for s in series["samples"] if s["ok"]] if series else []
            if ok:
                walls = [s["wall"] for s in ok]
                points.append(
                    (size["input_bytes"] / 1e9, statistics.median(walls), max(s["peak_rss"] for s in ok))
                )
        if points:
            xs = [p[0] for p in points]
            style = (
                {"linewidth": 2.5}
                if tool == "llamapro"
                else {"linestyle": "--" if "llamapro" in tool else "-"}
            )
            label = LABELS[tool].replace("*", "").replace("`", "")
            ax_t.plot(xs, [p[1] for p in points], marker="o", label=label, **style)
            ax_m.plot(xs, [p[2] / 1e6 for p in points], marker="o", label=label, **style)
    ax_t.set(xlabel="input checkpoint (GB)", ylabel="wall time, cold, incl. sync (s)", title="Time")
    ax_m.set(xlabel="input checkpoint (GB)", ylabel="peak RSS (MB, log)", title="Memory", yscale="log")
    ax_m.axhline(100, color="grey", linewidth=0.8, linestyle=":")
    for ax in (ax_t, ax_m):
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


# --- copy-on-write filesystems (`--fs`) -------------------------------------------------------------------


def _median(series: dict[str, Any], key: str) -> float:
    values = [s[key] for s in series["samples"] if s["ok"] and s.get(key, -1) >= 0]
    return statistics.median(values) if values else float("nan")


def _wall(series: dict[str, Any]) -> float:
    return statistics.median(s["wall"] for s in series["samples"] if s["ok"])


def _space(n: float) -> str:
    if n != n:  # nan: not measured
        return "—"
    n = max(n, 0)
    return f"{n / 1e3:.0f} KB" if n < 1e6 else _mb(n)


def _fs_row(series: dict[str, Any], dd: float, floor: float) -> str:
    walls = sorted(s["wall"] for s in series["samples"] if s["ok"])
    if not walls:
        return f"| {LABELS[series['tool']]} | failed or skipped: {series['note'][:120]} | | | | | | |"
    median, pb = statistics.median(walls), per_byte(series)
    new, du = _median(series, "allocated"), _median(series, "du")
    return (
        f"| {LABELS[series['tool']]} | {median:.2f} s ({walls[0]:.2f}–{walls[-1]:.2f}) | {_space(new)} "
        f"| {_space(du)} | {_gb(series['bytes_written'])} | {pb / dd:.3f} "
        f"| {f'{median / floor:.1f} ×' if floor == floor else '—'} | {series['correct'] or '—'} |"
    )


def fs_table(results: dict[str, Any], size: dict[str, Any]) -> list[str]:
    by = {s["tool"]: s for s in size["series"]}
    ok = {t: s for t, s in by.items() if any(x["ok"] for x in s["samples"])}
    dd = per_byte(ok["dd"]) if "dd" in ok else float("nan")
    floor = _wall(ok["cp-reflink"]) if "cp-reflink" in ok else float("nan")
    loads = [x["load"] for s in size["series"] for x in s["samples"]]
    lines = [
        f"### {results['fs']}: {size['label']}, {_gb(size['input_bytes'])} in {size['shards']} shard(s), "
        f"`--every {size['every']}` ({size['layers']} → {size['layers_out']} layers)",
        "",
        f"{size['runs']} cold run(s) per tool, alternated; 1-minute load average at the start of the runs "
        f"{min(loads, default=0):.1f}–{max(loads, default=0):.1f} (2 cores shared with other work).",
        "",
        "| tool | wall, median (min–max) | new space (df) | `du` of output | written (logical) "
        "| per byte vs dd | wall vs `cp --reflink` | output correct |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [_fs_row(by[t], dd, floor) for t in FS_ORDER if t in by]
    return [*lines, "", *fs_targets(results["fs"], ok), ""]


def fs_targets(fs: str, by: dict[str, Any]) -> list[str]:
    """The copy-on-write goals (issue 13), for what this run measured."""
    out = ["| figure | goal | measured | holds |", "|---|---|---|---|"]
    if fs != "ext4" and "llamapro" in by:
        wall, share = (
            _wall(by["llamapro"]),
            _median(by["llamapro"], "allocated") / by["llamapro"]["bytes_written"],
        )
        out.append(f"| expand, wall incl. sync | ≤ 1.0 s | {wall:.2f} s | {_yes(wall <= 1.0)} |")
        out.append(
            f"| expand, new space / output size | ≤ 1 % | {100 * share:.2f} % | {_yes(share <= 0.01)} |"
        )
    if fs != "ext4" and {"llamapro-digests", "read"} <= set(by):  # a goal where the output is cloned
        ratio = _wall(by["llamapro-digests"]) / _wall(by["read"])
        out.append(
            f"| expand --digests vs a direct-I/O read of the input | ≤ 1.1 × | {ratio:.2f} × "
            f"| {_yes(ratio <= 1.1)} |"
        )
    if fs == "ext4" and {"llamapro", "dd"} <= set(by):
        ratio = per_byte(by["llamapro"]) / per_byte(by["dd"])
        out.append(
            f"| expand per byte vs `dd` direct (no regression) | ≤ 1.1 × | {ratio:.2f} × "
            f"| {_yes(ratio <= 1.1)} |"
        )
    return out if len(out) > 2 else []


def render_fs(all_results: list[dict[str, Any]]) -> str:
    lines = [FS_START, ""]
    for results in all_results:
        env = results["environment"]
        for size in results["sizes"]:
            lines += [
                f"Measured {size.get('date', results['date'])} by "
                f"`bench/run.py {size.get('args', results['args'])}` on {env['cores']} cores ({env['cpu']}), "
                f"{env['memory']}, {results['fs']} on a loop-mounted image on the same disk, kernel "
                f"{env['kernel']}; page cache dropped before every run ({results['cache']}).",
                "",
                *fs_table(results, size),
            ]
    return "\n".join([*lines, FS_END])


def write_fs_doc(doc: Path, paths: list[Path]) -> None:
    """Render every bench/results-fs-*.json into the copy-on-write section of the page."""
    if not paths:
        return
    text = doc.read_text()
    if FS_START not in text:
        text += f"\n## Copy-on-write filesystems\n\n{FS_START}\n{FS_END}\n"
    head, rest = text.split(FS_START, 1)
    _, tail = rest.split(FS_END, 1)
    doc.write_text(head + render_fs([json.loads(p.read_text()) for p in paths]) + tail)
