"""sha256 of the bytes a shard shares with its sources, read once, for an engine that does not read them.

The clone engine moves no data, so `--digests` has to read it: each distinct source range of the shard
(`runs.digest_key`) that no earlier shard hashed is read once and hashed, and every tensor with the same
bytes (a copied layer and its source) gets that digest; zero tensors get the precomputed digest of
zeros. The reading is the direct engine's pipeline with its writes switched off (`DirectWriter` on no
file): `O_DIRECT` reads into the buffer ring, hashing threads beside them, so a cloned expansion with
digests costs one direct-I/O read of its input. sha256 is sequential within a tensor, and one ring of a
few 8 MiB buffers holds only part of one large tensor, so a single reader hashes on one core at a time:
the ranges of a file are split in two halves of equal bytes, read by two readers (each with half the
ring) side by side, so both cores hash.

Invariant: a source range is read at most once per expansion (`known` carries digests across shards);
memory is the direct engine's ring. Must not: write anything, import torch.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from llamapro_cli.io.direct import DirectWriter
from llamapro_cli.io.header import ALIGN, OutTensor
from llamapro_cli.io.runs import DigestKey, digest_key, zeros_sha256
from llamapro_cli.io.sources import SourceFiles


def hash_sources(
    tensors: Sequence[OutTensor],
    known: MutableMapping[DigestKey, str],
    *,
    chunk: int,
    buffers: int,
    progress: Callable[[int], None] | None,
    delay: float = 0.0,
    files: SourceFiles | None = None,
) -> dict[str, str]:
    """{name: sha256 hex} of every tensor; reads and hashes the ranges not in `known`, and adds them."""
    fresh = sorted({key for t in tensors if (key := digest_key(t)) is not None and key not in known})
    progress = _serialised(progress)  # two readers may report at once
    how = _Reading(chunk, buffers, progress, delay, files)
    for source in dict.fromkeys(path for path, _, _ in fresh):
        _hash_file(source, [key for key in fresh if key[0] == source], known, how)
    out = {}
    for t in tensors:
        key = digest_key(t)
        out[t.name] = zeros_sha256(t.nbytes) if key is None else known[key]
    if progress is not None:  # copies and zeros read nothing: their bytes count as done now
        progress(sum(t.nbytes for t in tensors) - sum(n for _, _, n in fresh))
    return out


@dataclass(frozen=True)
class _Reading:
    """How one reader reads: its ring (`buffers` of `chunk` bytes) and what it reports to."""

    chunk: int
    buffers: int
    progress: Callable[[int], None] | None
    delay: float
    files: SourceFiles | None


def _hash_file(
    source: Path, keys: list[DigestKey], known: MutableMapping[DigestKey, str], how: _Reading
) -> None:
    """Hash `keys` (ranges of `source`, in offset order) into `known`: two readers side by side when
    there is more than one core and enough bytes for both, else one."""
    halves = _halves(keys) if (os.cpu_count() or 1) > 1 else [keys]
    if len(halves) == 1:
        _read_and_hash(source, keys, known, how)
        return
    if how.files is not None:  # open the descriptors here, not racing in two threads
        how.files.fd(source)
        how.files.direct_fd(source)
    each = replace(how, buffers=max(2, how.buffers // 2))  # the same memory as one reader
    failed: list[BaseException] = []

    def second() -> None:
        try:
            _read_and_hash(source, halves[1], known, each)
        except BaseException as e:  # raised again in the calling thread
            failed.append(e)

    helper = threading.Thread(target=second, daemon=True)
    helper.start()
    try:
        _read_and_hash(source, halves[0], known, each)
    finally:
        while helper.is_alive():  # a timeout, so that signal handlers run while we wait
            helper.join(0.2)
    if failed:
        raise failed[0]


SPLIT_MIN = 128 * 1024 * 1024  # below this, one reader is as fast (and starts nothing)


def _halves(keys: list[DigestKey]) -> list[list[DigestKey]]:
    """`keys` cut in two of about equal bytes (whole ranges); one part when small or indivisible."""
    total = sum(n for _, _, n in keys)
    if total < SPLIT_MIN or len(keys) < 2:
        return [keys]
    acc = 0
    for i, (_, _, n) in enumerate(keys, start=1):
        acc += n
        if acc * 2 >= total:
            cut = min(i, len(keys) - 1)
            return [keys[:cut], keys[cut:]]
    return [keys]  # unreachable: the loop always cuts


def _read_and_hash(
    source: Path, keys: list[DigestKey], known: MutableMapping[DigestKey, str], how: _Reading
) -> None:
    # The ranges as the tensors of a file written nowhere, after a lead-in that gives the first range
    # its source phase: adjacent ranges coalesce into one run read straight into place with O_DIRECT.
    ranges = [OutTensor(str(index), "U8", (n,), source, offset) for index, (_, offset, n) in enumerate(keys)]
    lead_in = bytes(keys[0][1] % ALIGN)
    reader = DirectWriter(
        -1,
        source,
        chunk=how.chunk,
        buffers=how.buffers,
        digests=True,
        progress=how.progress,
        delay=how.delay,
        files=how.files,
    )
    digests = reader.write(lead_in, ranges)
    for index, key in enumerate(keys):
        known[key] = digests[str(index)]  # one key per reader: the two never write the same entry


def _serialised(progress: Callable[[int], None] | None) -> Callable[[int], None] | None:
    if progress is None:
        return None
    lock = threading.Lock()

    def report(n: int) -> None:
        with lock:
            progress(n)

    return report
