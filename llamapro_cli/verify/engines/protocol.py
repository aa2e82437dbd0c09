"""llamapro's side of the exchange with an adapter: write the request, read back each model's arrays.

The format is the one `adapters/adapter_io.py` documents (protocol 1: `request.json` + `ids.npy` in,
`engine.json`, `<name>.json` and `<name>.{full,cached,greedy}.npy` out). Both sides keep their own copy
of the names, because the adapter cannot import llamapro; `tests/test_engines.py` keeps them in step.

Invariant: nothing an adapter wrote is trusted: every document is checked for shape and type, and a
missing or malformed one is a `ProtocolError` naming the file.
Must not: run anything; import torch at module level.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

PROTOCOL = 1
REQUEST = "request.json"
IDS = "ids.npy"
ENGINE = "engine.json"
BASE, EXPANDED = "base", "expanded"


class ProtocolError(Exception):
    """An adapter's answer is missing or malformed."""


@dataclass(frozen=True)
class Job:
    """What one adapter run computes: the same ids through each model, one after the other."""

    engine: str
    dtype: str
    device: str
    threads: int
    ids: Sequence[int]
    prefill: int
    decode_steps: int
    models: tuple[tuple[str, Path], ...]  # (name, checkpoint folder or .gguf file)
    options: Mapping[str, Any]


@dataclass(frozen=True)
class ModelFailure:
    name: str
    stage: str  # "load" or "run"
    error: str  # the engine's own reason, one line


@dataclass(frozen=True)
class EngineArrays:
    """One model's outputs as the engine gave them (rows x vocab, float32; greedy ids)."""

    full: npt.NDArray[np.float32]
    cached: npt.NDArray[np.float32]
    greedy: npt.NDArray[np.int64]
    kind: str  # "logits", or "logprobs" where the engine gives only those
    info: Mapping[str, Any]


def write_request(folder: Path, job: Job) -> None:
    import numpy as np

    np.save(folder / IDS, np.asarray(list(job.ids), dtype=np.int64))
    request = {
        "protocol": PROTOCOL,
        "engine": job.engine,
        "dtype": job.dtype,
        "device": job.device,
        "threads": job.threads,
        "prefill": job.prefill,
        "decode_steps": job.decode_steps,
        "models": [{"name": name, "path": str(path)} for name, path in job.models],
        "options": dict(job.options),
    }
    (folder / REQUEST).write_text(json.dumps(request, indent=1))


def read_versions(folder: Path) -> dict[str, str]:
    doc = _document(folder / ENGINE)
    versions = doc.get("versions")
    if not isinstance(versions, dict):
        raise ProtocolError(f"{folder / ENGINE}: no versions")
    return {str(k): str(v) for k, v in versions.items()}


def read_failure(folder: Path, names: Sequence[str]) -> ModelFailure | None:
    """The first model the adapter reported as failed, if any."""
    for name in names:
        path = folder / f"{name}.json"
        if not path.is_file():
            continue
        doc = _document(path)
        if doc.get("ok") is False:
            return ModelFailure(name, str(doc.get("stage", "run")), str(doc.get("error", "no reason given")))
    return None


def read_arrays(folder: Path, name: str, *, tokens: int, decode_steps: int) -> EngineArrays:
    """One model's arrays, checked against the request: rows, one vocabulary, finite ids."""
    import numpy as np

    doc = _document(folder / f"{name}.json")
    if doc.get("ok") is not True:
        raise ProtocolError(f"{folder / (name + '.json')}: the model did not run")
    full, cached = _load(folder / f"{name}.full.npy"), _load(folder / f"{name}.cached.npy")
    greedy = _load(folder / f"{name}.greedy.npy")
    kind = str(doc.get("kind", "logits"))
    if full.ndim != 2 or cached.ndim != 2 or full.shape[1] != cached.shape[1]:
        raise ProtocolError(f"{folder}: {name} arrays have shapes {full.shape} and {cached.shape}")
    if full.shape[0] > tokens or cached.shape[0] > tokens:
        raise ProtocolError(f"{folder}: {name} has more rows than the {tokens} tokens sent")
    if greedy.shape != (decode_steps,) or greedy.dtype.kind not in "iu":
        raise ProtocolError(f"{folder}: {name} greedy ids have shape {greedy.shape} ({greedy.dtype})")
    return EngineArrays(
        full.astype(np.float32, copy=False),
        cached.astype(np.float32, copy=False),
        greedy.astype(np.int64, copy=False),
        kind,
        doc,
    )


def _load(path: Path) -> Any:
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)  # an adapter's file is data, never code
    except (OSError, ValueError) as e:
        raise ProtocolError(f"{path}: {e}") from None


def _document(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ProtocolError(f"{path}: {e}") from None
    if not isinstance(doc, dict):
        raise ProtocolError(f"{path}: not a JSON object")
    return doc
