"""What the shard writers share: block arithmetic, runs of bytes, and the digest of zeros.

Owns `plan_runs()`, which turns a shard's tensor list into runs: consecutive output bytes that come from
one contiguous source range (tensors adjacent in both source and output coalesce: a layer's tensors are
contiguous in its shard and written in that order) or are all zeros. Owns `align_up` / `align_down` to
the `ALIGN` block, the sha256 of n zero bytes, a zero buffer that costs no memory until read, and
`digest_key()`, which says when two tensors are the same bytes.

Invariant: pure functions of the tensor layout; nothing here opens a file. Must not: import a writer
(the writers import this), import torch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from llamapro_cli.io.header import ALIGN, OutTensor

# What a tensor's bytes are, for reusing its digest: (source, absolute offset, nbytes). Two tensors with
# the same key hold the same bytes (a copied layer and its source), so one hash serves both.
DigestKey = tuple[Path, int, int]
ZERO_BUFFER = (1 << 20) + 2 * ALIGN
ZEROS = memoryview(bytes(ZERO_BUFFER))  # calloc'd: reading it maps the zero page, no RSS


def align_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def align_down(n: int) -> int:
    return n // ALIGN * ALIGN


def digest_key(t: OutTensor) -> DigestKey | None:
    """The key of a copied tensor's bytes; None for zeros (their digest is `zeros_sha256`)."""
    return None if t.source is None else (t.source, t.offset, t.nbytes)


@lru_cache(maxsize=64)
def zeros_sha256(nbytes: int) -> str:
    """sha256 of `nbytes` zero bytes (zeroed copies repeat a few sizes: hash each size once)."""
    digest = hashlib.sha256()
    for start in range(0, nbytes, len(ZEROS)):
        digest.update(ZEROS[: min(len(ZEROS), nbytes - start)])
    return digest.hexdigest()


@dataclass(frozen=True)
class Run:
    """Consecutive output bytes from one contiguous source range (or zeros when `source` is None)."""

    start: int  # absolute output offset
    nbytes: int
    source: Path | None
    offset: int  # absolute source offset
    names: tuple[tuple[int, str], ...]  # (output offset, tensor name) of the tensors it covers

    @property
    def end(self) -> int:
        return self.start + self.nbytes


def plan_runs(tensors: Sequence[OutTensor], data_start: int) -> list[Run]:
    """Coalesce tensors that are adjacent in both source and output into single runs."""
    runs: list[Run] = []
    position = data_start
    for t in tensors:
        n = t.nbytes
        if n == 0:
            continue
        last = runs[-1] if runs else None
        if (
            last is not None
            and last.source == t.source
            and (t.source is None or last.offset + last.nbytes == t.offset)
        ):
            names = (*last.names, (position, t.name))
            runs[-1] = Run(last.start, last.nbytes + n, last.source, last.offset, names)
        else:
            runs.append(Run(position, n, t.source, t.offset, ((position, t.name),)))
        position += n
    return runs
