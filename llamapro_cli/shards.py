"""The output's shard layout and the small JSON files written beside the shards.

Owns `ShardSummary` (one safetensors file, written or read), `parse_size()` (`--max-shard-size`), the
split of the output tensors into standard `model-0000K-of-0000N.safetensors` shards (by size, never two
source files in one shard: see `split_shards`), the index (`model.safetensors.index.json`) and the JSON
writer every output file uses (exclusive create, fsynced, one format so hashes of the provenance record
are reproducible).

Invariant: the split depends on tensor sizes, order and source files only.
Must not: read tensor data; print.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamapro_cli.errors import OutputError, UsageError
from llamapro_cli.io.header import OutTensor
from llamapro_cli.plan import parse_int, shown

Shards = tuple[tuple[str, tuple[OutTensor, ...]], ...]  # (file name, tensors) per output shard


@dataclass(frozen=True)
class ShardSummary:
    """One safetensors file of a checkpoint (written, or read by `inspect`): name, tensor count, file size."""

    name: str
    tensors: int
    bytes: int
    engine: str | None = None  # what wrote it: clone, direct or buffered (None in a dry run)


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', '1.5GB' or a byte count -> bytes (decimal and binary units, like
    huggingface_hub). Exact integer arithmetic on digits bounded by `parse_int`: no float to overflow."""
    if isinstance(text, int):
        return text
    option, hint = "--max-shard-size", "e.g. 5GB, 500MB, 2GiB"
    m = re.fullmatch(r"\s*([0-9]+)(?:\.([0-9]+))?\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"{option} {shown(text)} is not a size", hint=hint)
    whole = parse_int(m.group(1), option=option, what="a size", hint=hint)
    fraction = m.group(2) or ""
    tenths = parse_int(fraction, option=option, what="a size", hint=hint) if fraction else 0
    unit = (m.group(3) or "B").upper()
    scale: int = (1024 if "I" in unit else 1000) ** "BKMGT".index(unit[0])
    denominator: int = 10 ** len(fraction)
    size = (whole * denominator + tenths) * scale // denominator
    if size < 1:
        raise UsageError(f"{option} {shown(text)} must be positive")
    return size


def split_shards(tensors: list[OutTensor], max_shard: int) -> Shards:
    """Standard `model-0000K-of-0000N.safetensors` shards of at most `max_shard` bytes (a larger tensor
    alone), each holding copies of ONE source file only.

    Why one source per shard: an output shard's data can keep the block phase (offset mod 4096) of one
    source file only, and bytes at their source phase are what the clone engine shares and the direct
    engine reads straight into place; a shard mixing two sources copies the other one's bytes. So the
    tensors are grouped by source file, in the order each file first appears (a stable partition: inside
    a group the output order is kept), and each group is cut at `max_shard`. Zero tensors (no source)
    join the group of the tensor before them (the first group when they lead).
    """
    groups: dict[Path | None, list[OutTensor]] = {}
    current: Path | None = next((t.source for t in tensors if t.source is not None), None)
    for t in tensors:
        if t.source is not None:
            current = t.source
        groups.setdefault(current, []).append(t)
    cut: list[list[OutTensor]] = []
    for group in groups.values():
        size = 0
        start = len(cut)
        for t in group:
            if len(cut) == start or (size + t.nbytes > max_shard and size > 0):
                cut.append([])
                size = 0
            cut[-1].append(t)
            size += t.nbytes
    if len(cut) == 1:
        return (("model.safetensors", tuple(cut[0])),)
    n = len(cut)
    return tuple((f"model-{k + 1:05d}-of-{n:05d}.safetensors", tuple(ts)) for k, ts in enumerate(cut))


def write_index(path: Path, shards: Shards) -> None:
    # total_size counts tensor bytes only, as transformers and huggingface_hub write it.
    total = sum(t.nbytes for _, ts in shards for t in ts)
    index = {
        "metadata": {"total_size": total},
        "weight_map": {t.name: name for name, ts in shards for t in ts},
    }
    write_json(path, index)


def sha256_json(record: dict[str, Any]) -> str:
    """sha256 of a JSON document as `write_json` writes it (the provenance record, `digests` still null)."""
    return hashlib.sha256(json_text(record).encode()).hexdigest()


def json_text(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def write_json(path: Path, data: Any) -> None:
    try:
        with open(path, "x", encoding="utf-8") as f:
            f.write(json_text(data))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OutputError(f"cannot write {path}: {os.strerror(e.errno or 0)}") from e
