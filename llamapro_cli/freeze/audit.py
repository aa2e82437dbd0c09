"""`verify_frozen()`: did training leave every frozen tensor bit-identical, and did it move the new layers?

The reference is the freeze map's sha256 digests (`expand --digests`), or, without them, the expanded
checkpoint's own bytes. The trained checkpoint is read as bare safetensors files by `trained.py`, which
names each tensor by the map's key whatever prefix, sharding or file layout the trainer used. A tensor
whose dtype changed (trainers upcast trainable tensors to fp32) is converted back to its original dtype
chunk by chunk, and only when that round trip is exact can it still be "unchanged".

Invariant: tensor data is streamed in bounded chunks (at most `io.ranges.CHUNK` bytes per read); the
report, not an exception, says whether the check failed. Must not: print, choose exit codes, import
torch except to convert dtypes.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from llamapro_cli.architectures.record import layer_index
from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.errors import InputError, UsageError
from llamapro_cli.freeze.apply import reference_map
from llamapro_cli.freeze.claims import check_new_layers, zero_by_digest, zero_by_value
from llamapro_cli.freeze.manifest import manifest_family
from llamapro_cli.freeze.map import FreezeMap, TensorEntry
from llamapro_cli.freeze.trained import TrainedTensor, is_lora, lora_target, open_trained
from llamapro_cli.io import ranges
from llamapro_cli.io.header import tensor_nbytes
from llamapro_cli.io.ranges import read_chunks

Progress = Callable[[int, int], None]
REF_DIGESTS = "sha256 digests recorded by expand --digests"
REF_BYTES = "the expanded checkpoint's bytes"
# safetensors dtype -> torch dtype name, for converting a re-typed trained tensor back.
TORCH_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip


@dataclass(frozen=True)
class Changed:
    name: str  # checkpoint key
    reason: str


@dataclass(frozen=True)
class Retyped:
    """A trained tensor stored in another dtype than the expanded checkpoint's."""

    name: str
    dtype: str
    trained_dtype: str
    exact: bool  # its values round-trip exactly through the original dtype
    trainable: bool


@dataclass(frozen=True)
class FrozenReport:
    """What `verify-frozen` found. `ok` is False when a frozen tensor changed or is missing."""

    map: str
    trained: str
    reference: str
    ok: bool
    new_layers: tuple[int, ...]
    frozen_checked: int
    frozen_unchanged: int
    changed: tuple[Changed, ...]
    missing: tuple[str, ...]
    trainable_checked: int
    trainable_changed: int
    trainable_missing: tuple[str, ...]
    unchanged_new_layers: tuple[int, ...]  # new layers none of whose tensors changed
    retyped: tuple[Retyped, ...]
    stripped_prefixes: tuple[str, ...]
    extra: tuple[str, ...]  # trained tensors the map does not know (e.g. LoRA weights)
    trained_files: int
    bytes_read: int
    warnings: tuple[str, ...]
    seconds: float


def verify_frozen(
    map_or_expanded: str | Path | FreezeMap,
    trained: str | Path,
    *,
    also: Sequence[str] = (),
    progress: Progress | None = None,
) -> FrozenReport:
    """Compare a trained checkpoint with a freeze map (a manifest file, or an expanded checkpoint)."""
    started = time.monotonic()
    fm, label = reference_map(map_or_expanded, also)
    reference = _reference(fm)
    _refuse_self_comparison(reference, Path(trained))
    if isinstance(map_or_expanded, FreezeMap) or not Path(map_or_expanded).expanduser().is_dir():
        _check_claims(fm, reference, label)  # a folder's record was checked by freeze_map()
    heads = tied_heads(fm)
    files, tensors, stripped, extra = open_trained(Path(trained), fm, heads=heads)
    for head, embeddings in heads.items():
        if embeddings not in tensors and head in tensors:  # one name kept per shared tensor (save_model)
            tensors[embeddings] = tensors.pop(head)
    audit = _Audit(fm, reference, progress, total=sum(t.info.nbytes for t in tensors.values()))
    for name in fm.tensors:
        audit.check(name, tensors.get(name))
    for head, embeddings in heads.items():
        if head in tensors:  # the trainer untied the head: it must still be the embedding matrix
            audit.check(head, tensors[head], like=embeddings)
    for raw in extra:  # unmerged LoRA matrices change the weight they adapt at load time
        target = lora_target(raw)
        if is_lora(raw) and target in fm.tensors and target not in audit.trainable:
            audit.changed.append(Changed(target, f"a LoRA adapter on it was saved ({raw})"))
    return audit.report(label, str(trained), files, stripped, extra, time.monotonic() - started)


def _check_claims(fm: FreezeMap, ref: _Reference, label: str) -> None:
    """A manifest's new layers must be identity copies in what it was made from (digests or bytes):
    otherwise an original layer would be audited as trainable."""
    family = manifest_family(fm, label)
    if ref.ckpt is None:
        digests = {n: e.sha256 for n, e in fm.tensors.items()}
        is_zero = zero_by_digest(digests, lambda n: tensor_nbytes(fm.tensors[n].dtype, fm.tensors[n].shape))
    else:
        is_zero = zero_by_value(ref.ckpt)
    hint = (
        "the map does not describe the expanded checkpoint (edited, or made from trained weights): "
        "use the expanded checkpoint or the manifest written before training"
    )
    check_new_layers(family, fm.layer_prefix, fm.tensors, fm.new_layers, is_zero, where=label, hint=hint)


class _Reference:
    """Where the original bytes' identity comes from: recorded digests, or the expanded checkpoint."""

    def __init__(self, fm: FreezeMap, ckpt: Checkpoint | None) -> None:
        self.fm, self.ckpt = fm, ckpt

    @property
    def label(self) -> str:
        return REF_BYTES if self.ckpt else REF_DIGESTS

    def matches(self, name: str, chunks: Iterator[memoryview]) -> bool:
        if self.ckpt is None:
            digest = hashlib.sha256()
            for chunk in chunks:
                digest.update(chunk)
            return digest.hexdigest() == self.fm.tensors[name].sha256
        done = 0
        for chunk in chunks:
            if self.ckpt.read_bytes(name, skip=done, size=len(chunk)) != chunk.tobytes():  # a memcmp
                return False
            done += len(chunk)
        return True


def tied_heads(fm: FreezeMap) -> dict[str, str]:
    """Head keys a tied map does not store -> the embedding key they are (a trained checkpoint may hold
    them once the trainer unties the head; they are then the frozen embedding matrix, or changed)."""
    if not fm.tied_embeddings:
        return {}
    roles = manifest_family(fm, fm.checkpoint).roles
    embeddings = next((e for e in roles.embeddings if e in fm.tensors), None)
    return {h: embeddings for h in roles.head if embeddings and h not in fm.tensors}


def _reference(fm: FreezeMap) -> _Reference:
    if all(entry.sha256 for entry in fm.tensors.values()):
        return _Reference(fm, None)
    try:
        ckpt = Checkpoint.open(fm.checkpoint)
    except InputError as e:
        raise InputError(
            f"the freeze map has no digests and its checkpoint {fm.checkpoint} cannot be read ({e.message})",
            hint="pass the expanded checkpoint with --map, or expand with --digests",
        ) from None
    for name, entry in fm.tensors.items():
        info = ckpt.info(name) if name in ckpt.weight_map else None
        if info is None or info.dtype != entry.dtype or info.shape != entry.shape:
            raise InputError(f"{ckpt.root}: tensor {name} differs from the freeze map's record of it")
    unknown = next((n for n in ckpt.weight_map if n not in fm.tensors), None)
    if unknown is not None:  # a tensor the map leaves out would never be audited
        raise InputError(f"{ckpt.root}: tensor {unknown} is not in the freeze map")
    return _Reference(fm, ckpt)


def _refuse_self_comparison(ref: _Reference, trained: Path) -> None:
    """Without digests the expanded checkpoint is the reference: training that saved into the same folder
    overwrote it, and comparing it with itself would pass whatever training did."""
    if ref.ckpt is None:
        return
    root, target = ref.ckpt.root.resolve(), trained.resolve()
    if target == root or target.is_relative_to(root):
        raise UsageError(
            f"--trained {trained} is the expanded checkpoint the map compares against, and the map has "
            "no digests: there is nothing to compare it with",
            hint="expand with --digests before training (the digests survive an in-place save), "
            "or keep the expanded checkpoint apart from the training output",
        )


class _Audit:
    """Per-tensor verdicts, accumulated into a `FrozenReport`."""

    def __init__(self, fm: FreezeMap, ref: _Reference, progress: Progress | None, total: int) -> None:
        self.fm, self.ref, self.progress, self.total = fm, ref, progress, total
        self.trainable = set(fm.trainable)
        # Keys that are no parameter of their own: a tied head (it *is* the embedding matrix) or a buffer.
        self.not_parameters = {n for n, e in fm.tensors.items() if e.parameter is None}
        self.changed: list[Changed] = []
        self.missing: list[str] = []
        self.trainable_missing: list[str] = []
        self.trainable_changed: set[str] = set()
        self.retyped: list[Retyped] = []
        self.checked = [0, 0]  # frozen, trainable
        self.done = 0

    def check(self, name: str, found: TrainedTensor | None, *, like: str | None = None) -> None:
        """Audit `name`; `like`: the map's tensor it must equal (the embeddings, for an untied head)."""
        ref = like or name
        entry = self.fm.tensors[ref]
        trainable = ref in self.trainable
        if found is None:
            if name not in self.not_parameters:  # never "missing": trainers need not save them
                (self.trainable_missing if trainable else self.missing).append(name)
            return
        self.checked[trainable] += 1
        reason = self._compare(ref, entry, found, trainable)
        if reason is not None and like is not None:
            reason = f"{reason}; compared with {like}, which the tied head is"
        self.done += found.info.nbytes
        if self.progress:
            self.progress(self.done, self.total)
        if reason is not None:
            if trainable:
                self.trainable_changed.add(name)
            else:
                self.changed.append(Changed(name, reason))

    def _compare(self, name: str, entry: TensorEntry, t: TrainedTensor, trainable: bool) -> str | None:
        dtype, shape = entry.dtype, entry.shape
        if t.info.shape != shape:
            return f"shape {list(shape)} -> {list(t.info.shape)}"
        if t.info.dtype == dtype:
            return None if self.ref.matches(name, _raw_chunks(t)) else "values differ"
        if not (t.info.dtype in TORCH_DTYPES and dtype in TORCH_DTYPES):
            self.retyped.append(Retyped(name, dtype, t.info.dtype, False, trainable))
            return f"stored as {t.info.dtype}, which cannot be compared with {dtype}"
        conversion = _Conversion(t, dtype)
        same = self.ref.matches(name, conversion.chunks())
        self.retyped.append(Retyped(name, dtype, t.info.dtype, conversion.exact, trainable))
        if not conversion.exact:
            return f"stored as {t.info.dtype}; its values are not all representable in {dtype}"
        return None if same else f"values differ (compared after converting {t.info.dtype} to {dtype})"

    def report(
        self, label: str, trained: str, files: int, stripped: Sequence[str], extra: Sequence[str], secs: float
    ) -> FrozenReport:
        fm = self.fm
        moved = {_layer(fm, n) for n in self.trainable_changed}
        present = {_layer(fm, n) for n in self.trainable if n not in self.trainable_missing}
        idle = tuple(i for i in fm.new_layers if i in present and i not in moved)
        return FrozenReport(
            map=label,
            trained=trained,
            reference=self.ref.label,
            ok=not self.changed and not self.missing,
            new_layers=fm.new_layers,
            frozen_checked=self.checked[0],
            frozen_unchanged=self.checked[0] - len(self.changed),
            changed=tuple(self.changed),
            missing=tuple(self.missing),
            trainable_checked=self.checked[1],
            trainable_changed=len(self.trainable_changed),
            trainable_missing=tuple(self.trainable_missing),
            unchanged_new_layers=idle,
            retyped=tuple(self.retyped),
            stripped_prefixes=tuple(stripped),
            extra=tuple(extra),
            trained_files=files,
            bytes_read=self.done,  # of the trained checkpoint (byte mode reads as much again)
            warnings=tuple(self._warnings(idle)),
            seconds=round(secs, 3),
        )

    def _warnings(self, idle: Sequence[int]) -> list[str]:
        out = []
        if idle and self.checked[1] and not self.trainable_changed:
            out.append(
                "no tensor of the new layers changed: did training run? (or is this the expanded model?)"
            )
        elif idle:
            out.append(
                f"new layers {', '.join(map(str, idle))} did not change at all: did training reach them?"
            )
        if self.trainable_missing:
            out.append(f"{len(self.trainable_missing)} trainable tensors are not in the trained checkpoint")
        return out


def _layer(fm: FreezeMap, name: str) -> int | None:
    return layer_index(name, fm.layer_prefix)


def _raw_chunks(t: TrainedTensor) -> Iterator[memoryview]:
    return read_chunks(t.path, t.offset, t.info.nbytes)


class _Conversion:
    """Trained values converted to the original dtype, chunk by chunk, with an exact round-trip check.

    One pass: `chunks()` stops at the first chunk whose values do not survive trained dtype -> original
    -> trained dtype bit for bit, and `exact` says so (an fp32 copy of bf16 values always survives).
    """

    def __init__(self, t: TrainedTensor, dtype: str) -> None:
        self.t, self.dtype, self.exact = t, dtype, True

    def chunks(self) -> Iterator[memoryview]:
        import torch

        src = getattr(torch, TORCH_DTYPES[self.t.info.dtype])
        dst = getattr(torch, TORCH_DTYPES[self.dtype])
        width = torch.empty((), dtype=src).element_size()
        size = ranges.CHUNK  # read at call time, so a test can lower it to cross chunk boundaries
        step = max(width, size - size % width)  # whole elements per chunk
        for view in read_chunks(self.t.path, self.t.offset, self.t.info.nbytes, step):
            chunk = torch.frombuffer(view, dtype=src)  # shares the read buffer: no copy
            converted = chunk.to(dst)
            if not torch.equal(converted.to(src).view(torch.uint8), chunk.view(torch.uint8)):
                self.exact = False
                return
            yield converted.view(torch.uint8).numpy().data
