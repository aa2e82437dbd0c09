"""`make bench`: llamapro expand against cp -r, a direct-I/O dd copy and mergekit, on real model shapes.

    .venv/bin/python bench/run.py                      # 1.1B and 7B, 3 runs each, writes docs/performance.md
    .venv/bin/python bench/run.py --sizes 1b --runs 1  # a few minutes
    .venv/bin/python bench/run.py --quick              # 1.1B, one run, no mergekit, prints only
    .venv/bin/python bench/run.py --render-only        # re-render the page and plot from bench/results.json
    .venv/bin/python bench/run.py --fs xfs --sizes 1b   # on a loop-mounted XFS image (root): clone engine
    .venv/bin/python bench/run.py --suite relayer       # SOLAR depth up-scaling against mergekit

`--fs xfs|btrfs|ext4` runs everything on a fresh loop-mounted image of that filesystem (bench/fsimage.py,
input generated on it) and records, beside the wall time, the new space each run allocated (settled
free space before and after) and `du` of its output; the tools are then llamapro (automatic engine:
clone where the filesystem shares extents), llamapro with the direct engine forced, llamapro
--digests, `cp -r --reflink=always` (the floor), `cp -r`, `dd` direct and a direct-I/O read of the
input; mergekit when named in --tools. Results go to bench/results-fs-<fs>.json and the copy-on-write
section of docs/performance.md.

Inputs are synthetic checkpoints of real shapes (bench/synth.py) under bench/.work (git-ignored), made
once and reused; `--clean` deletes them at the end. Each run is cold (page cache dropped), includes the
final `sync`, and its output is deleted before the next; tools are alternated within each round. Needs
root for drop_caches (else posix_fadvise on the inputs) and about input + 1.5 × input of free disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fsimage
import measure
import peers
import relayer_bench
import report
import synth

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "bench" / ".work"
RESULTS = REPO / "bench" / "results.json"
RELAYER_RESULTS = REPO / "bench" / "results-relayer.json"
DOC = REPO / "docs" / "performance.md"
PNG = REPO / "docs" / "img" / "bench.png"
EVERY = {"1b": 2, "7b": 4}
ALL_TOOLS = ["llamapro", "llamapro-digests", "llamapro-buffered", "dd", "cp", "mergekit"]
FS_TOOLS = ["llamapro", "llamapro-direct", "llamapro-digests", "cp-reflink", "cp", "dd", "read"]


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--suite",
        choices=["expand", "relayer"],
        default="expand",
        help="expand (LLaMA Pro, the default) or relayer (SOLAR depth up-scaling against mergekit)",
    )
    p.add_argument("--sizes", default="", help="comma-separated: 1b, 7b (relayer: qwen2-0.5b, 7b)")
    p.add_argument("--runs", type=int, default=3, help="cold runs per tool and size")
    p.add_argument(
        "--tools",
        default="",
        help="comma-separated: " + ", ".join(dict.fromkeys(ALL_TOOLS + FS_TOOLS + relayer_bench.TOOLS)),
    )
    p.add_argument(
        "--fs", choices=sorted(fsimage.MKFS), help="run on a loop-mounted image of this filesystem"
    )
    p.add_argument("--quick", action="store_true", help="1b, one run, no mergekit; print, write no doc")
    p.add_argument("--no-doc", action="store_true", help="do not touch docs/ (results go to bench/.work)")
    p.add_argument("--clean", action="store_true", help="delete the generated checkpoints at the end")
    p.add_argument("--render-only", action="store_true", help="re-render docs from bench/results.json")
    args = p.parse_args()
    relayer = args.suite == "relayer"
    args.sizes = args.sizes or ("qwen2-0.5b,7b" if relayer else "1b,7b")
    default_tools = relayer_bench.TOOLS if relayer else FS_TOOLS if args.fs else ALL_TOOLS
    args.tools = args.tools or ",".join(default_tools)
    if args.quick:
        args.sizes, args.runs, args.no_doc = "qwen2-0.5b" if relayer else "1b", 1, True
        args.tools = ",".join(t for t in args.tools.split(",") if t != "mergekit")
    return args


def bench_size(
    name: str, tools: list[str], runs: int, mergekit_note: str, root: Path = WORK, space: bool = False
) -> dict[str, Any]:
    shape, every = synth.SHAPES[name], EVERY[name]
    print(f"== {shape.label}: generating (or reusing) the input", flush=True)
    src = synth.generate(shape, root / "models")
    input_bytes = measure.logical_size(src)
    out = root / "out"
    series = {t: measure.Series(t, name) for t in tools}
    for run in range(runs):
        for tool in tools[run % len(tools) :] + tools[: run % len(tools)]:  # rotate: alternated order
            s = series[tool]
            measure.remove(out)  # the last run's output, before the free-space check
            s.note = s.note or measure.skip_reason(tool, input_bytes, mergekit_note, root)
            if s.note:
                continue
            command = peers.command(tool, src, out, every=every, work=WORK)
            sample = measure.run(command, inputs=[src], out=out, space=space)
            s.samples.append(sample)
            if sample.ok:
                s.bytes_written = input_bytes if tool == "read" else measure.logical_size(out)
                if peers.TOOLS[tool].expands and not s.correct:
                    s.correct = peers.check_expansion(src, out, every)
            else:
                s.note = (
                    "failed: " + sample.log.strip().splitlines()[-1][:200] if sample.log.strip() else "failed"
                )
            space_note = f"  new {sample.allocated / 1e6:9.1f} MB" if space else ""
            print(
                f"  run {run + 1} {tool:18s} {sample.wall:7.2f} s  {sample.peak_rss / 1e6:8.0f} MB  "
                f"load {sample.load:.1f}{space_note}  {'ok' if sample.ok else 'FAILED'} {s.correct}",
                flush=True,
            )
            measure.remove(out)
    layers_out = len(peers.layer_map(shape.layers, every))
    return {
        "name": name,
        "label": shape.label,
        "input_bytes": input_bytes,
        "shards": len(list(src.glob("*.safetensors"))),
        "layers": shape.layers,
        "layers_out": layers_out,
        "every": every,
        "runs": runs,
        "series": [asdict(s) for s in series.values()],
    }


def quick_figures(sizes: list[str]) -> dict[str, Any]:
    """--help, inspect, expand --dry-run (70B-shaped headers over sparse files): warm and cold."""
    llamapro = str(peers.BIN / "llamapro")
    big = "7b" if "7b" in sizes else "1b"
    model = synth.generate(synth.SHAPES[big], WORK / "models")
    headers = synth.generate(synth.SHAPES["70b"], WORK / "models", headers_only=True)
    commands = {
        "llamapro --help": [llamapro, "--help"],
        f"llamapro inspect {big.upper()}": [llamapro, "inspect", str(model)],
        "llamapro inspect 70B": [llamapro, "inspect", str(headers)],
        "llamapro expand --dry-run 70B": [
            llamapro, "expand", "--in", str(headers), "--out", str(WORK / "dry"), "--every", "4", "--dry-run"
        ],
    }  # fmt: skip
    out: dict[str, Any] = {}
    for name, cmd in commands.items():
        measure.drop_caches([model, headers])
        started = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        cold = time.perf_counter() - started
        out[name] = {"warm": measure.quick_timings(cmd), "cold": cold, "goal": "< 0.3 s"}
        print(f"  {name:34s} warm {min(out[name]['warm']):.2f} s  cold {cold:.2f} s", flush=True)
    return out


def fs_main(args: argparse.Namespace) -> None:
    """`--fs`: every size on a fresh loop-mounted image of that filesystem."""
    sizes, tools = args.sizes.split(","), args.tools.split(",")
    mergekit_note = peers.setup_mergekit(WORK) if "mergekit" in tools else ""
    inputs = sum(synth.SHAPES[s].nbytes() for s in sizes)
    largest = max(synth.SHAPES[s].nbytes() for s in sizes)
    with fsimage.mounted(args.fs, WORK, inputs + largest * 2 + (4 << 30)) as mount:
        env = {**peers.environment(), "filesystem": args.fs, "device": "loop-mounted image on /dev/vda"}
        results: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "args": " ".join(sys.argv[1:]),
            "fs": args.fs,
            "environment": env,
            "cache": measure.drop_caches([]),
            "sizes": [bench_size(s, tools, args.runs, mergekit_note, mount, space=True) for s in sizes],
        }
    for size in results["sizes"]:
        size["date"], size["args"] = results["date"], results["args"]
    target = (
        WORK / f"results-fs-{args.fs}.json" if args.no_doc else REPO / "bench" / f"results-fs-{args.fs}.json"
    )
    if target.exists():  # keep the other sizes measured on this filesystem before
        earlier = json.loads(target.read_text())
        kept = [z for z in earlier["sizes"] if z["name"] not in sizes]
        results["sizes"] = sorted(kept + results["sizes"], key=lambda z: z["input_bytes"])
    target.write_text(json.dumps(results, indent=1) + "\n")
    if not args.no_doc:
        report.write_fs_doc(DOC, sorted((REPO / "bench").glob("results-fs-*.json")))
    print("\n".join(ln for ln in report.render_fs([results]).splitlines() if ln.startswith(("|", "###"))))


def main() -> None:
    args = _args()
    if args.render_only:
        results = json.loads(RESULTS.read_text())
        report.write_doc(DOC, results)
        report.write_fs_doc(DOC, sorted((REPO / "bench").glob("results-fs-*.json")))
        if RELAYER_RESULTS.exists():
            relayer_bench.write_doc(DOC, json.loads(RELAYER_RESULTS.read_text()))
        print("plot:", report.plot(results, PNG))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    if args.suite == "relayer":
        relayer_bench.main(
            args.sizes.split(","),
            args.tools.split(","),
            args.runs,
            WORK,
            doc=None if args.no_doc else DOC,
            results=WORK / "results-relayer.json" if args.no_doc else RELAYER_RESULTS,
        )
        return
    if args.fs:
        fs_main(args)
        return
    sizes, tools = args.sizes.split(","), args.tools.split(",")
    mergekit_note = peers.setup_mergekit(WORK) if "mergekit" in tools else ""
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "args": " ".join(sys.argv[1:]) or "(defaults)",
        "environment": peers.environment(),
        "cache": measure.drop_caches([]),
        "mergekit": peers.mergekit_version(WORK) if "mergekit" in tools and not mergekit_note else "not run",
        "sizes": [bench_size(s, tools, args.runs, mergekit_note) for s in sizes],
    }
    print("== start-up and header-only commands", flush=True)
    results["quick"] = quick_figures(sizes)
    target = WORK / "results.json" if args.no_doc else RESULTS
    target.write_text(json.dumps(results, indent=1) + "\n")
    if not args.no_doc:
        report.write_doc(DOC, results)
        print("plot written:", report.plot(results, PNG))
    print("\n".join(ln for ln in report.render(results).splitlines() if ln.startswith(("|", "###"))))
    if args.clean:
        shutil.rmtree(WORK / "models", ignore_errors=True)
    os.sync()


if __name__ == "__main__":
    main()
