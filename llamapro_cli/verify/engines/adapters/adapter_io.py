"""The engine side of the exchange: read the request, run each model, write its arrays or its failure.

The folder holds `request.json` (protocol 1: engine, dtype, device, threads, prefill, decode_steps, the
models as name + path, engine options) and `ids.npy` (int64, shape (tokens,)). Per model the adapter
writes `<name>.full.npy` (float32, (rows, vocab): logits, or log-probabilities where the engine gives only
those), `<name>.cached.npy` (float32, (rows, vocab): the cached pass), `<name>.greedy.npy` (int64,
(decode_steps,)) and then `<name>.json` (`{"ok": true, ...what the engine says}`; on failure `{"ok":
false, "stage": "load"|"run", "error": one line}`), and first of all `engine.json` (the versions).

Exit status: 0 every model ran; 3 a model could not be loaded or run (its `<name>.json` says why); 2 a
bad request. llamapro's `protocol.py` writes and reads the same files; a test keeps the two in step.
Must not: import llamapro (this runs in the engine's interpreter); import an engine at module level.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

PROTOCOL = 1
REQUEST = "request.json"
IDS = "ids.npy"
ENGINE = "engine.json"
EXIT_OK, EXIT_USAGE, EXIT_MODEL = 0, 2, 3


@dataclass(frozen=True)
class Request:
    folder: Path
    engine: str
    dtype: str  # "float32", "bfloat16" or "float16"
    device: str  # "cpu" or "cuda" (MLX: "gpu" means Metal)
    threads: int
    ids: list[int]
    prefill: int  # tokens fed at once before the cached one-token steps
    decode_steps: int  # cached one-token steps, and greedy tokens generated after the sequence
    models: tuple[tuple[str, str], ...]  # (name, path): a checkpoint folder, or a .gguf file
    options: Mapping[str, Any]


@dataclass(frozen=True)
class Passes:
    """One model's outputs (numpy arrays) and what the engine says about them."""

    full: Any
    cached: Any
    greedy: Any
    info: Mapping[str, Any]


def read_request(folder: Path) -> Request:
    import numpy as np

    raw = json.loads((folder / REQUEST).read_text())
    if raw.get("protocol") != PROTOCOL:
        raise ValueError(f"protocol {raw.get('protocol')!r}, this adapter speaks {PROTOCOL}")
    ids = np.load(folder / IDS)
    return Request(
        folder=folder,
        engine=str(raw["engine"]),
        dtype=str(raw["dtype"]),
        device=str(raw["device"]),
        threads=int(raw["threads"]),
        ids=[int(x) for x in ids.reshape(-1)],
        prefill=int(raw["prefill"]),
        decode_steps=int(raw["decode_steps"]),
        models=tuple((str(m["name"]), str(m["path"])) for m in raw["models"]),
        options=dict(raw.get("options") or {}),
    )


def dist_versions(*names: str) -> dict[str, str]:
    """Installed versions of these distributions (absent ones are left out)."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:500]


def write_json(path: Path, value: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)  # the reader never sees half a document


def save(folder: Path, name: str, passes: Passes) -> None:
    import numpy as np

    np.save(folder / f"{name}.full.npy", np.ascontiguousarray(passes.full, dtype=np.float32))
    np.save(folder / f"{name}.cached.npy", np.ascontiguousarray(passes.cached, dtype=np.float32))
    np.save(folder / f"{name}.greedy.npy", np.asarray(passes.greedy, dtype=np.int64).reshape(-1))
    write_json(folder / f"{name}.json", {"ok": True, **passes.info})


def main(
    argv: list[str],
    versions: Callable[[], dict[str, str]],
    load: Callable[[Request, str], Any],
    run: Callable[[Request, Any], Passes],
) -> int:
    """`ADAPTER --versions` prints the versions as JSON; `ADAPTER FOLDER` serves the request in it."""
    if argv == ["--versions"]:
        print(json.dumps(versions()))
        return EXIT_OK
    if len(argv) != 1:
        print("usage: ADAPTER --versions | ADAPTER FOLDER", file=sys.stderr)
        return EXIT_USAGE
    folder = Path(argv[0])
    try:
        request = read_request(folder)
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"bad request in {folder}: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    write_json(folder / ENGINE, {"versions": versions()})
    for name, path in request.models:
        for stage in ("load", "run"):
            try:
                if stage == "load":
                    handle = load(request, path)
                else:
                    save(folder, name, run(request, handle))
                    del handle  # free this model before the next one is loaded
            except Exception as e:  # the engine raises anything; its reason is what the user needs
                traceback.print_exc()
                write_json(folder / f"{name}.json", {"ok": False, "stage": stage, "error": one_line(e)})
                return EXIT_MODEL
    return EXIT_OK
