"""The tools compared: llamapro itself, `cp -r`, a direct-I/O `dd` copy, and mergekit's passthrough merge.

`--fs` adds the forced direct engine, `cp -r --reflink=always` (the floor on a filesystem that shares
extents) and a direct-I/O read of the input (what `--digests` costs when nothing else is moved).

Also: mergekit's own virtual environment (created once under bench/.work, torch installed first from
the pinned CPU wheel so pip pulls no CUDA build), the mergekit config that performs the same LLaMA Pro
expansion (zero `scale` on the branch-final projections of each copy), and an independent check that
an expanded output holds exactly the expected tensors (byte-equal copies, all-zero branch ends).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ZEROED = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


@dataclass(frozen=True)
class Tool:
    key: str
    label: str
    expands: bool  # writes an expanded model (else a plain copy of the input)


TOOLS = {
    "llamapro": Tool("llamapro", "llamapro expand", True),
    "llamapro-digests": Tool("llamapro-digests", "llamapro expand --digests", True),
    "llamapro-buffered": Tool(
        "llamapro-buffered", "llamapro expand, buffered engine (LLAMAPRO_DIRECT_IO=0)", True
    ),
    "llamapro-direct": Tool(
        "llamapro-direct", "llamapro expand, direct engine (LLAMAPRO_ENGINE=direct)", True
    ),
    "cp-reflink": Tool("cp-reflink", "cp -r --reflink=always (shares every block: the floor)", False),
    "read": Tool("read", "direct-I/O read of the input (dd iflag=direct of=/dev/null)", False),
    "dd": Tool("dd", "direct-I/O copy (dd bs=64M iflag=direct oflag=direct)", False),
    "cp": Tool("cp", "cp -r", False),
    "mergekit": Tool("mergekit", "mergekit passthrough (zero scale)", True),
}


def layer_map(layers: int, every: int) -> list[tuple[int, bool]]:
    """(source layer, is a zeroed copy) for each output layer of LLaMA Pro's `--every` plan."""
    out: list[tuple[int, bool]] = []
    for i in range(layers):
        out.append((i, False))
        if (i + 1) % every == 0:
            out.append((i, True))
    return out


def command(tool: str, src: Path, out: Path, *, every: int, work: Path) -> str:
    if tool == "llamapro":
        return f"{BIN}/llamapro expand --in {src} --out {out} --every {every} --quiet"
    if tool == "llamapro-digests":
        return f"{BIN}/llamapro expand --in {src} --out {out} --every {every} --quiet --digests"
    if tool == "llamapro-buffered":
        return f"LLAMAPRO_DIRECT_IO=0 {BIN}/llamapro expand --in {src} --out {out} --every {every} --quiet"
    if tool == "llamapro-direct":
        return f"LLAMAPRO_ENGINE=direct {BIN}/llamapro expand --in {src} --out {out} --every {every} --quiet"
    if tool == "cp":
        return f"cp -r {src} {out}"
    if tool == "cp-reflink":
        return f"cp -r --reflink=always {src} {out}"
    if tool == "read":
        return (
            f'for f in {src}/*.safetensors; do dd if="$f" of=/dev/null bs=64M iflag=direct status=none '
            "|| exit 1; done"
        )
    if tool == "dd":
        return (
            f"mkdir {out} && for f in {src}/*.safetensors; do "
            f'dd if="$f" of={out}/"$(basename "$f")" bs=64M iflag=direct oflag=direct status=none '
            "|| exit 1; done"
        )
    if tool == "mergekit":
        config = work / f"mergekit-{src.name}-every{every}.yml"
        config.write_text(mergekit_config(src, every))
        return f"{mergekit_venv(work)}/bin/mergekit-yaml {config} {out} --quiet"
    raise ValueError(tool)


def mergekit_config(src: Path, every: int) -> str:
    """YAML (as JSON, a subset of YAML) for a passthrough merge that does LLaMA Pro's expansion."""
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    zero = {
        "scale": [{"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.0}, {"value": 1.0}]
    }
    slices = []
    for start in range(0, layers, every):
        end = min(start + every, layers)
        slices.append({"sources": [{"model": str(src), "layer_range": [start, end]}]})
        if end - start == every:
            copy = {"model": str(src), "layer_range": [end - 1, end], "parameters": zero}
            slices.append({"sources": [copy]})
    return json.dumps({"merge_method": "passthrough", "dtype": "bfloat16", "slices": slices}, indent=1)


def mergekit_venv(work: Path) -> Path:
    return work / "mergekit-venv"


def setup_mergekit(work: Path) -> str:
    """Create the venv once; '' when mergekit is usable, else why not."""
    venv = mergekit_venv(work)
    if (venv / "bin" / "mergekit-yaml").exists():
        return ""
    steps = [
        ["python3", "-m", "venv", str(venv)],
        [str(venv / "bin" / "pip"), "install", "-q", "torch==2.13.0"],
        [str(venv / "bin" / "pip"), "install", "-q", "mergekit"],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            return f"mergekit not installable here ({' '.join(step[-2:])}: {done.stderr.strip()[-200:]})"
    return ""


def mergekit_version(work: Path) -> str:
    pip = mergekit_venv(work) / "bin" / "pip"
    done = subprocess.run([str(pip), "show", "mergekit"], capture_output=True, text=True)
    return next((ln.split()[1] for ln in done.stdout.splitlines() if ln.startswith("Version:")), "?")


# --- the independent output check -----------------------------------------------------------------------


def _headers(folder: Path) -> dict[str, tuple[Path, int, int, str, list[int]]]:
    """name -> (file, absolute offset, nbytes, dtype, shape), parsed here without llamapro's reader."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            doc = json.loads(fh.read(n))
        doc.pop("__metadata__", None)
        for name, e in doc.items():
            b, end = e["data_offsets"]
            out[name] = (f, 8 + n + b, end - b, e["dtype"], e["shape"])
    return out


def _chunks(offset: int, nbytes: int, step: int = 32 << 20) -> list[tuple[int, int]]:
    return [(offset + s, min(step, nbytes - s)) for s in range(0, nbytes, step)]


def _read(path: Path, offset: int, n: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(n)


def check_expansion(src: Path, out: Path, every: int) -> str:
    """'yes', 'yes (zeros are -0.0)' or 'no: why' for an expanded output folder."""
    return check_map(src, out, layer_map(_layer_count(src), every))


def check_map(src: Path, out: Path, entries: list[tuple[int, bool]]) -> str:
    """'yes', 'yes (zeros are -0.0)' or 'no: why': output layer j holds exactly source layer entries[j][0]'s
    tensors (branch ends zeroed where entries[j][1]), every other tensor is the source's."""
    have, want = _headers(out), _headers(src)
    expected: dict[str, tuple[str | None, str]] = {}
    for name in want:
        if not name.startswith("model.layers."):
            expected[name] = (name, name)
    for j, (i, copy) in enumerate(entries):
        for name in want:
            if name.startswith(f"model.layers.{i}."):
                rel = name[len(f"model.layers.{i}.") :]
                expected[f"model.layers.{j}.{rel}"] = (None if copy and rel in ZEROED else name, name)
    if set(have) != set(expected):
        return f"no: {len(set(expected) ^ set(have))} tensor names differ"
    negative_zero = False
    for name, (source, like) in expected.items():
        f, off, n, dtype, shape = have[name]
        if (dtype, shape) != (want[like][3], want[like][4]):
            return f"no: {name} has dtype/shape {dtype} {shape}"
        for (o, k), (so, _) in zip(_chunks(off, n), _chunks(want[like][1], n), strict=True):
            data = _read(f, o, k)
            if source is None:
                bits = np.frombuffer(data, dtype=np.uint16)
                if (bits & 0x7FFF).any():
                    return f"no: {name} is not zero"
                negative_zero |= bool(bits.any())
            elif data != _read(want[source][0], so, k):
                return f"no: {name} differs from {source}"
    return "yes (zeros are -0.0)" if negative_zero else "yes"


def _layer_count(folder: Path) -> int:
    return int(json.loads((folder / "config.json").read_text())["num_hidden_layers"])


def environment() -> dict[str, str]:
    """The facts a reader needs to compare figures across machines."""

    def sh(cmd: str) -> str:
        return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True).stdout.strip()

    return {
        "cpu": sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip(),
        "cores": str(os.cpu_count()),
        "memory": sh("free -g | awk '/Mem:/{print $2\" GiB\"}'"),
        "kernel": sh("uname -r"),
        "filesystem": sh(f"df -T {REPO} | awk 'NR==2{{print $2}}'"),
        "device": sh(f"df {REPO} | awk 'NR==2{{print $1}}'"),
    }


if __name__ == "__main__":  # `python bench/peers.py setup-mergekit`: the first step of `make test-peers`
    if sys.argv[1:] != ["setup-mergekit"]:
        sys.exit("usage: python bench/peers.py setup-mergekit")
    why = setup_mergekit(REPO / "bench" / ".work")
    if why:
        sys.exit(why)
    print(
        f"mergekit {mergekit_version(REPO / 'bench' / '.work')} in {mergekit_venv(REPO / 'bench' / '.work')}"
    )
