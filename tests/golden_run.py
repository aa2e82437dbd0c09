"""The golden transcript: a fixed set of user commands on the demo checkpoint, run as a user runs them
(`python -m llamapro_cli` in a subprocess), with stdout, stderr, exit code and the written files' hashes
recorded and normalised (temporary paths, times, memory figures). `tests/test_golden.py` compares it with
`tests/golden/transcript.txt`, so a refactoring that changes anything a user sees fails the suite.

Regenerate after an intended change of behaviour: `.venv/bin/python tests/golden_run.py --update`, and
read the diff (`git diff tests/golden/`) as the review of what users will see differently."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden" / "transcript.txt"
FORMATS = ("text", "names", "json", "regex", "axolotl", "llama-factory", "peft", "swift", "hf")
COMMANDS = (
    "inspect",
    "expand",
    "relayer",
    "verify-identity",
    "freeze-map",
    "verify-frozen",
    "merge-adapter",
    "push",
    "demo-checkpoint",
)
# Values that legitimately change from run to run.
VOLATILE_KEYS = ("seconds", "peak_rss_bytes", "peak_gpu_bytes", "created", "free_space")
_FREE = re.compile(r"^(free space +)\d+(?:\.\d+)? [KMGT]?B", re.MULTILINE)  # the disk's, not ours
_TIME = re.compile(r"\b\d+(?:\.\d+)? ?(?:s|ms)\b")
_RSS = re.compile(
    r"RSS +\d+(?:\.\d+)? ?(?:MB|GB)|\d+(?:\.\d+)? ?(?:MB|GB) (?:peak )?RSS|\d+(?:\.\d+)? GB free"
)


def _scrub_json(value: object) -> object:
    if isinstance(value, dict):
        return {k: ("<volatile>" if k in VOLATILE_KEYS else _scrub_json(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_json(v) for v in value]
    return value


def _normalise(text: str, root: Path) -> str:
    text = text.replace(str(root), "<D>").replace(str(root.resolve()), "<D>")
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            doc = json.loads(stripped)
        except json.JSONDecodeError:
            pass
        else:
            return json.dumps(_scrub_json(doc), indent=2) + "\n"
    text = _FREE.sub(r"\1<free>", _RSS.sub("<rss>", text))
    return _TIME.sub("<t>", text)


def _shard_digest(path: Path) -> str:
    """sha256 of a shard with the one volatile metadata value (the record's hash) blanked."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.get("__metadata__", {})
    for key in list(meta):
        if "sha256" in key:
            meta[key] = "<volatile>"
    canon = json.dumps(header, sort_keys=True).encode()
    return hashlib.sha256(canon + raw[8 + n :]).hexdigest()


def _folder_digests(folder: Path, root: Path) -> str:
    lines = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        if path.suffix == ".safetensors":
            digest = _shard_digest(path)
        elif path.name == ".llamapro-files.json":  # the record of what expand wrote: names and sizes
            files = json.loads(path.read_text())["files"]
            canon = json.dumps({name: entry["size"] for name, entry in sorted(files.items())})
            digest = hashlib.sha256(canon.encode()).hexdigest()
        elif path.name == "llamapro.json":
            doc = _scrub_json(json.loads(path.read_text()))
            canon = _normalise(json.dumps(doc), root)
            digest = hashlib.sha256(canon.encode()).hexdigest()
        elif path.name == ".llamapro-files.json":  # sizes, mtimes, hashes: what --force may remove
            digest = "files " + ",".join(sorted(json.loads(path.read_text())["files"]))
        elif path.name == "README.md":
            digest = hashlib.sha256(_normalise(path.read_text(), root).encode()).hexdigest()
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        lines.append(f"  {rel}  {digest}")
    return "\n".join(lines) + "\n"


def transcript() -> str:
    with tempfile.TemporaryDirectory(prefix="llamapro-golden-") as tmp:
        root = Path(tmp)
        env = {
            **os.environ,
            "NO_COLOR": "1",
            "COLUMNS": "100",
            "TERM": "dumb",
            "MKL_CBWR": "AUTO,STRICT",
            "HF_HUB_OFFLINE": "1",
            # Plain progress lines appear only in runs longer than the interval: on a loaded machine that
            # depends on the load, so the transcript records none.
            "LLAMAPRO_PROGRESS_INTERVAL": "1e9",
        }
        env.pop("LLAMAPRO_DEBUG", None)
        out: list[str] = []

        def run(*args: str) -> None:
            proc = subprocess.run(
                [sys.executable, "-m", "llamapro_cli", *args],
                cwd=root,
                env=env,
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
            )
            out.append(f"$ llamapro {' '.join(args)}\n[exit {proc.returncode}]\n")
            out.append("--- stdout\n" + _normalise(proc.stdout, root))
            out.append("--- stderr\n" + _normalise(proc.stderr, root) + "\n")

        def files(folder: str) -> None:
            out.append(f"$ files {folder}\n" + _folder_digests(root / folder, root) + "\n")

        run("--help")
        for command in COMMANDS:
            run(command, "--help")
        run("demo-checkpoint", "base")
        run("inspect", "base")
        run("inspect", "base", "--json")
        run("expand", "--every", "4", "--in", "base", "--out", "dry", "--dry-run")
        run("expand", "--every", "4", "--in", "base", "--out", "dry", "--dry-run", "--json")
        run("expand", "--add", "3", "--placement", "top", "--in", "base", "--out", "dry", "--dry-run")
        run("expand", "--every", "4", "--in", "base", "--out", "pro", "--digests")
        files("pro")
        run("expand", "--after", "1,5,5", "--in", "base", "--out", "pro2", "--json")
        files("pro2")
        run("expand", "--every", "4", "--in", "base", "--out", "pro")
        run("inspect", "pro")
        run("inspect", "pro", "--json")
        for fmt in FORMATS:
            run("freeze-map", "pro", "--format", fmt)
        run("verify-identity", "--out", "pro")
        run("verify-identity", "--out", "pro2", "--json")
        run("verify-identity", "--out", "pro", "--engine", "native", "--json")
        run("verify-frozen", "--map", "pro", "--trained", "pro2")
        run("verify-frozen", "--map", "pro", "--trained", "pro2", "--report", "--quiet")  # no progress lines
        run("verify-frozen", "--map", "pro2", "--trained", "pro2", "--json")
        run("inspect", "no-such-folder")
        run("expand", "--every", "0", "--in", "base", "--out", "bad")
        run("relayer", "--layers", "0-5,2-7", "--in", "base", "--out", "dus")  # depth up-scaling: 8 -> 12
        files("dus")
        run("relayer", "--drop-new", "--in", "pro", "--out", "undo", "--json")  # the base, byte for byte
        files("undo")
        run("inspect", "undo")
        run("verify-identity", "--out", "dus")
        run("relayer", "--layers", "0-8", "--in", "base", "--out", "bad")
        return "".join(out)


if __name__ == "__main__":
    text = transcript()
    if "--update" in sys.argv:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
        print(f"wrote {GOLDEN}", file=sys.stderr)
    else:
        sys.stdout.write(text)
