"""`merge_adapter()`: a PEFT LoRA adapter merged into a checkpoint, streaming, into a new complete folder.

Every output tensor is one of: a byte range of the model's shards (untouched tensors, and with PEFT's
`layer_replication` each replica of its source layer), a byte range of the adapter file (a full tensor it
replaces, same dtype), or a tensor computed alone in memory (`lora.merge_into`: the base weight plus its
LoRA delta, bit-identical to PEFT's `merge_and_unload()`), staged in a scratch file inside the temporary
output folder. The expand engine writes the shards (`write_shard`) into `atomic_output`'s temporary
sibling, so the output appears complete or not at all.

Layout: without `layer_replication` the output keeps the model's shard files, tensor order and config.json
bytes. With it, layer j of the output is base layer `map[j]` (PEFT's `replicate_layers`), plus the LoRA
saved under index j; the config is rewritten by the expand engine's `rewrite_config` (count and every
per-layer field by source), and shards are split like expand's.

Provenance: when the model has a `llamapro.json`, the output gets the same record plus an `"adapter"`
key (path, sha256 of the adapter's weights and config, its settings, the merged tensors); a second merge
keeps the first adapter record as that key's `parent`. Every shard's metadata names the adapter's sha256.

Invariant: model and adapter are only read; peak memory is one weight plus its float32 delta plus the
writer's buffers. Must not: print, execute or unpickle anything from the folders.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llamapro_cli.adapter import Adapter, LoraPair, read_adapter
from llamapro_cli.architectures.rewrite import rewrite_config
from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.companions import carried_size, carry, companions
from llamapro_cli.errors import InputError, OutputError, UnsupportedError
from llamapro_cli.freeze.map import is_tied, memory_name
from llamapro_cli.io.files import INDEX_NAME, PROVENANCE_NAME
from llamapro_cli.io.header import OutTensor, TensorInfo
from llamapro_cli.io.outdir import MARGIN, atomic_output, check_disjoint
from llamapro_cli.io.writer import write_shard
from llamapro_cli.merge_layout import Layout, OutShard, plan_layout
from llamapro_cli.shards import parse_size
from llamapro_cli.version import __version__

Progress = Callable[[int, int], None]
SCRATCH = ".llamapro-merge-scratch"
ALIGN = 4096  # computed tensors start on a block boundary in the scratch file (direct-I/O reads)


@dataclass(frozen=True)
class MergeReport:
    """What `merge-adapter` did. `--json` prints exactly this."""

    model: str
    adapter: str
    out: str
    architecture: str
    num_layers_in: int
    num_layers_out: int
    layer_map: tuple[int, ...] | None  # output layer j is base layer layer_map[j] (layer_replication)
    merged: tuple[str, ...]  # checkpoint keys computed as W + LoRA delta
    replaced: tuple[str, ...]  # checkpoint keys taken whole from the adapter (modules_to_save, biases)
    copied: int  # tensors byte-copied from the model
    use_dora: bool
    use_rslora: bool
    adapter_sha256: str
    provenance: bool  # whether llamapro.json was written (the model had one)
    shards: tuple[str, ...]
    bytes_written: int
    carried: tuple[str, ...]
    warnings: tuple[str, ...]
    seconds: float


def merge_adapter(
    model: str | Path | Checkpoint,
    adapter: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    max_shard_size: str | int = "5GB",
    progress: Progress | None = None,
    command: str | None = None,
) -> MergeReport:
    """Merge the PEFT LoRA adapter folder `adapter` into `model`, writing the complete result to `out`."""
    started = time.monotonic()
    ckpt = model if isinstance(model, Checkpoint) else Checkpoint.open(model)
    lora = read_adapter(adapter)
    out_path = Path(out).expanduser().absolute()
    check_disjoint(ckpt.root, out_path)
    check_disjoint(lora.root, out_path)
    layout = plan_layout(ckpt, lora.layer_replication, parse_size(max_shard_size))
    if layout.layer_map is not None and ckpt.provenance is not None:
        raise UnsupportedError(
            f"{lora.root}: layer_replication on an expanded checkpoint ({ckpt.root} has llamapro.json): "
            "the merged layout could not be recorded",
            hint="replicate layers with llamapro expand instead, or merge into the unexpanded base",
        )
    merged, replaced = _targets(ckpt, lora, layout)
    warnings: list[str] = []
    if layout.layer_map is not None:
        config, config_warnings = rewrite_config(ckpt.family, ckpt.config, layout.plan_for_config())
        warnings += config_warnings
    else:
        config = None
    sizes = sum(t.nbytes for shard in layout.shards for t in shard.tensors)
    found = companions(ckpt.root)  # data only: a file named like a tokenizer but holding code stays behind
    warnings += found.warnings
    need = sizes + carried_size(ckpt.root, found.carried) + MARGIN
    with atomic_output(out_path, force=force, need_bytes=need, notes=warnings.append) as tmp:
        writer = _Writer(ckpt, lora, tmp, progress, total=sizes)
        shards = writer.write(layout.shards, merged, replaced)
        _write_index(tmp, layout)
        if config is None:
            _copy_file(ckpt.root / "config.json", tmp / "config.json")
        else:
            _write_json(tmp / "config.json", config)
        for name in found.carried:
            carry(ckpt.root, ckpt.root / name, tmp / name)
        if ckpt.provenance is not None:
            _write_json(tmp / PROVENANCE_NAME, _provenance(ckpt, lora, merged, replaced, command))
    return MergeReport(
        model=ckpt.repo_id or str(ckpt.root),
        adapter=str(lora.root),
        out=str(out_path),
        architecture=ckpt.family.name,
        num_layers_in=ckpt.num_layers,
        num_layers_out=len(layout.layer_map) if layout.layer_map else ckpt.num_layers,
        layer_map=layout.layer_map,
        merged=tuple(k for k in layout.tensors if k in merged),
        replaced=tuple(k for k in layout.tensors if k in replaced),
        copied=sum(len(s.tensors) for s in layout.shards) - len(merged) - len(replaced),
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        adapter_sha256=lora.weights_sha256,
        provenance=ckpt.provenance is not None,
        shards=shards,
        bytes_written=writer.done,
        carried=found.carried,
        warnings=tuple(warnings),
        seconds=round(time.monotonic() - started, 3),
    )


# --- which output tensor each adapter entry changes ------------------------------------------------------


def _targets(
    ckpt: Checkpoint, lora: Adapter, layout: Layout
) -> tuple[dict[str, LoraPair], dict[str, TensorInfo]]:
    """Output key -> the LoRA pair merged into it, and output key -> the adapter tensor replacing it."""
    family = ckpt.family
    tied = is_tied(ckpt)
    by_memory: dict[str, str] = {}
    for key in layout.tensors:
        by_memory.setdefault(memory_name(family, key), key)
    shared = set(family.roles.embeddings) | set(family.roles.head) if tied else set()
    where = lora.root
    merged: dict[str, LoraPair] = {}
    for pair in lora.pairs:
        key = _lookup(by_memory, f"{pair.module}.weight", where, "LoRA module")
        info = layout.tensors[key]
        if key in shared:
            raise UnsupportedError(f"{where}: LoRA on {key}, which the tied embeddings and head share")
        if info.dtype not in ("F32", "BF16", "F16") or len(info.shape) != 2:
            raise UnsupportedError(
                f"{where}: {key} is {info.dtype} {list(info.shape)}, not a float linear weight"
            )
        if info.shape != (pair.b.shape[0], pair.a.shape[1]):
            raise InputError(
                f"{where}: {pair.module}: LoRA of shape {[pair.b.shape[0], pair.a.shape[1]]} does not fit "
                f"{key} {list(info.shape)}",
                hint="was the adapter trained on this model (same expansion)?",
            )
        merged[key] = pair
    replaced: dict[str, TensorInfo] = {}
    for name, saved in lora.replaced.items():
        key = _lookup(by_memory, name, where, "saved tensor")
        info = layout.tensors[key]
        if key in shared:
            raise UnsupportedError(
                f"{where}: the adapter replaces {key}, which the tied embeddings and head share"
            )
        if key in merged:
            raise InputError(f"{where}: {key} is both adapted by LoRA and saved whole")
        if saved.shape != info.shape or saved.dtype not in ("F32", "BF16", "F16", "F64"):
            raise InputError(f"{where}: {saved.name} {saved.dtype} {list(saved.shape)} does not fit {key}")
        if info.dtype not in ("F32", "BF16", "F16", "F64") and saved.dtype != info.dtype:
            raise UnsupportedError(f"{where}: {saved.name} is {saved.dtype}, {key} is {info.dtype}")
        replaced[key] = saved
    return merged, replaced


def _lookup(by_memory: dict[str, str], name: str, where: Path, what: str) -> str:
    key = by_memory.get(name)
    if key is None:
        raise InputError(
            f"{where}: {what} {name} is not a parameter of this model",
            hint="an adapter merges into the model it was trained on (check --model)",
        )
    return key


# --- writing -------------------------------------------------------------------------------------------


class _Writer:
    """Writes the output shards; computed tensors go through the scratch file, one at a time."""

    def __init__(self, ckpt: Checkpoint, lora: Adapter, tmp: Path, progress: Progress | None, total: int):
        self.ckpt, self.lora, self.tmp, self.progress, self.total = ckpt, lora, tmp, progress, total
        self.done = 0
        self.scratch = tmp / SCRATCH

    def step(self, n: int) -> None:
        self.done += n
        if self.progress:
            self.progress(self.done, self.total)

    def write(
        self, shards: Sequence[OutShard], merged: dict[str, LoraPair], replaced: dict[str, TensorInfo]
    ) -> tuple[str, ...]:
        try:
            fd = os.open(self.scratch, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise OutputError(f"cannot write {self.scratch}: {e.strerror}") from None
        try:
            for shard in shards:
                os.ftruncate(fd, 0)  # the scratch holds one shard's computed tensors at a time
                tensors = [self._tensor(fd, t, merged, replaced) for t in shard.tensors]
                meta = {**shard.metadata, "llamapro_adapter_sha256": self.lora.weights_sha256}
                write_shard(self.tmp / shard.name, tensors, meta, progress=self.step, align=None)
        except OSError as e:
            raise OutputError(f"cannot write {self.scratch}: {e.strerror}") from None
        finally:
            os.close(fd)
            self.scratch.unlink(missing_ok=True)
        return tuple(s.name for s in shards)

    def _tensor(
        self, fd: int, t: OutTensor, merged: dict[str, LoraPair], replaced: dict[str, TensorInfo]
    ) -> OutTensor:
        if t.name in merged:
            data = self._merged(t, merged[t.name])
        elif t.name in replaced:
            saved = replaced[t.name]
            start = self.lora.header.absolute_range(saved.name)[0]
            if saved.dtype == t.dtype:  # a byte copy out of the adapter file
                return replace(t, source=self.lora.weights, offset=start)
            data = self._converted(t, saved)
        else:
            return t
        end = os.lseek(fd, 0, os.SEEK_END)
        offset = end + (-end % ALIGN)
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
        return replace(t, source=self.scratch, offset=offset)

    def _read(self, t: OutTensor) -> bytearray:
        assert t.source is not None  # every model tensor is a byte range (never zeros) here
        from llamapro_cli.io.ranges import read_into

        buffer = bytearray(t.nbytes)
        src = os.open(t.source, os.O_RDONLY | os.O_CLOEXEC)
        try:
            read_into(src, memoryview(buffer), t.offset, t.source)
        finally:
            os.close(src)
        return buffer

    def _adapter_tensor(self, info: TensorInfo) -> Any:
        from llamapro_cli.io.ranges import read_range
        from llamapro_cli.lora import as_tensor

        start = self.lora.header.absolute_range(info.name)[0]
        return as_tensor(bytearray(read_range(self.lora.weights, start, info.nbytes)), info.dtype, info.shape)

    def _merged(self, t: OutTensor, pair: LoraPair) -> bytearray:
        from llamapro_cli.lora import as_tensor, merge_into

        buffer = self._read(t)
        weight = as_tensor(buffer, t.dtype, t.shape)
        magnitude = self._adapter_tensor(pair.magnitude) if pair.magnitude is not None else None
        merge_into(
            weight, self._adapter_tensor(pair.a), self._adapter_tensor(pair.b), pair.scaling, magnitude
        )
        return buffer

    def _converted(self, t: OutTensor, saved: TensorInfo) -> bytearray:
        from llamapro_cli.lora import as_tensor, convert_into

        buffer = bytearray(t.nbytes)
        convert_into(as_tensor(buffer, t.dtype, t.shape), self._adapter_tensor(saved))
        return buffer


def _write_index(tmp: Path, layout: Layout) -> None:
    if len(layout.shards) == 1 and not layout.sharded:
        return
    total = sum(t.nbytes for s in layout.shards for t in s.tensors)
    weight_map = {t.name: s.name for s in layout.shards for t in s.tensors}
    _write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _provenance(
    ckpt: Checkpoint,
    lora: Adapter,
    merged: dict[str, LoraPair],
    replaced: dict[str, TensorInfo],
    command: str | None,
) -> dict[str, Any]:
    record = ckpt.provenance
    assert record is not None
    extra = dict(record.extra)
    adapter = {
        **lora.record(),
        "tool": f"llamapro {__version__}",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "merged": sorted(merged),
        "replaced": sorted(replaced),
        "parent": extra.get("adapter"),
    }
    extra["adapter"] = adapter
    return replace(record, extra=tuple(extra.items())).to_json()


def _copy_file(src: Path, dst: Path) -> None:
    """Copy a small companion file (config, tokenizer), following hub-cache links."""
    try:
        with open(src, "rb") as fsrc:
            try:
                with open(dst, "xb") as fdst:
                    shutil.copyfileobj(fsrc, fdst)
                    fdst.flush()
                    os.fsync(fdst.fileno())
            except OSError as e:
                raise OutputError(f"cannot write {dst}: {e.strerror}") from None
    except OSError as e:
        raise InputError(f"cannot read {src}: {e.strerror}") from None


def _write_json(path: Path, data: Any) -> None:
    _write_bytes(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def _write_bytes(path: Path, data: bytes) -> None:
    try:
        with open(path, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror}") from None
