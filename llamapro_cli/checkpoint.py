"""A checkpoint on disk: config.json, the safetensors headers and the index, cross-checked.

`Checkpoint.open()` accepts a folder or a hub repo id (resolved through huggingface_hub's cache,
offline-aware). It reads config.json, `model.safetensors.index.json` when present, and every shard's
header, and checks that they agree: the index names plain files that exist, every indexed tensor is in
its shard and every shard tensor is indexed, no tensor appears twice, the layer count in the config
matches the blocks present, and every block has the tensors its family needs.

Invariant: only headers are read; tensor data is never touched. Must not: write anything, import torch.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamapro_cli.architectures.record import Family
from llamapro_cli.architectures.registry import extra_layers, family_for, num_layers
from llamapro_cli.errors import InputError, UnsupportedError
from llamapro_cli.folder import check_within, resolve
from llamapro_cli.io.files import INDEX_NAME, PROVENANCE_NAME, SINGLE_NAME, read_json
from llamapro_cli.io.header import Header, TensorInfo, read_header
from llamapro_cli.io.ranges import read_chunks, read_range
from llamapro_cli.provenance import Provenance, RecordError

# headers by shard file, weight_map (tensor -> shard), sharded?, index metadata
Weights = tuple[dict[str, Header], dict[str, str], bool, dict[str, Any]]


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint folder. `weight_map` is name -> shard file name (relative)."""

    root: Path
    config: dict[str, Any]
    config_sha256: str
    family: Family
    num_layers: int
    headers: dict[str, Header]
    weight_map: dict[str, str]
    sharded: bool
    provenance: Provenance | None = None
    repo_id: str | None = None
    revision: str | None = None
    index_metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, source: str | Path, *, revision: str | None = None) -> Checkpoint:
        root, repo_id = resolve(source, revision=revision)
        return cls.assemble(
            root,
            lambda: _read_weights(root),
            repo_id=repo_id,
            revision=revision if repo_id else None,
            where=str(root / "config.json"),
        )

    @classmethod
    def assemble(
        cls,
        root: Path,
        load_weights: Callable[[], Weights],
        *,
        repo_id: str | None,
        revision: str | None,
        where: str,
    ) -> Checkpoint:
        """Validate config.json in `root`, then the weights `load_weights` reads (from the folder, or the
        Hub's API) against it. The config comes first: an unsupported architecture is the clearer error."""
        config, config_sha = _read_config(root)
        try:
            family = family_for(config)
        except UnsupportedError as e:  # name the file: the user may have several checkpoints at hand
            raise UnsupportedError(f"{e.message} (in {where})", hint=e.hint) from e
        count = num_layers(family, config)
        if count is None or count < 1:
            raise InputError(f"{where}: no valid {family.count_key} (the layer count)")
        headers, weight_map, sharded, index_metadata = load_weights()
        ckpt = cls(
            root=root,
            config=config,
            config_sha256=config_sha,
            family=family.for_checkpoint(weight_map),  # the on-disk layout these weights use
            num_layers=count,
            headers=headers,
            weight_map=weight_map,
            sharded=sharded,
            provenance=_read_provenance(root),
            repo_id=repo_id,
            revision=revision,
            index_metadata=index_metadata,
        )
        ckpt.check_layers()
        return ckpt

    def info(self, name: str) -> TensorInfo:
        return self.headers[self.weight_map[name]].tensors[name]

    def location(self, name: str) -> tuple[Path, int]:
        """(shard path, absolute byte offset) of a tensor's data."""
        header = self.headers[self.weight_map[name]]
        return header.path, header.absolute_range(name)[0]

    def read_chunks(self, name: str, *, step: int | None = None) -> Iterator[memoryview]:
        """A tensor's bytes in pieces of at most `step` (default `io.ranges.CHUNK`), through one reused
        buffer: each piece is valid only until the next is requested."""
        path, offset = self.location(name)
        return read_chunks(path, offset, self.info(name).nbytes, step)

    def read_bytes(self, name: str, *, skip: int = 0, size: int | None = None) -> bytes:
        """`size` bytes (default: the rest) of a tensor's data from byte `skip` on."""
        path, offset = self.location(name)
        nbytes = self.info(name).nbytes - skip if size is None else size
        return read_range(path, offset + skip, nbytes)

    def tensor_names(self) -> list[str]:
        """Every tensor, in shard order then file order."""
        return [name for header in self.headers.values() for name in header.tensors]

    def split_blocks(self) -> tuple[dict[int, list[str]], list[str]]:
        """Block tensors by layer index (block-relative names, file order) and the non-block tensors."""
        blocks: dict[int, list[str]] = {}
        other: list[str] = []
        # Layer-indexed modules just past the blocks (DeepSeek-V3 MTP layers) are not blocks.
        extra = range(self.num_layers, self.num_layers + extra_layers(self.family, self.config))
        for name in self.tensor_names():
            parts = self.family.split_name(name)  # exit 3 for a malformed layer name
            if parts and parts[0] not in extra:
                blocks.setdefault(parts[0], []).append(parts[1])
            else:
                other.append(name)
        return blocks, other

    def check_layers(self) -> None:
        blocks, _ = self.split_blocks()
        found = set(blocks)
        where = self.root / "config.json"
        if len(found) != self.num_layers or any(i >= self.num_layers for i in found):
            # Never materialise range(num_layers): a hostile config may claim 10**18 layers.
            missing = [i for i in range(min(self.num_layers, len(found) + 9)) if i not in found]
            extra = sorted(i for i in found if i >= self.num_layers)
            detail = f"missing layers {_short(missing)}" if missing else f"extra layers {_short(extra)}"
            raise InputError(
                f"{where}: {self.family.count_key} is {self.num_layers} but the weights have "
                f"{len(found)} layers under {self.family.layer_prefix} ({detail})"
            )
        for index in sorted(blocks):
            for pattern in self.family.required:
                if not any(re.fullmatch(pattern, rel) for rel in blocks[index]):
                    raise InputError(
                        f"{self.root}: layer {index} has no tensor matching "
                        f"{self.family.layer_prefix}{index}.{pattern.replace(chr(92), '')} "
                        f"({self.family.name} needs it in every layer)"
                    )

    def total_bytes(self) -> int:
        return sum(self.info(n).nbytes for n in self.weight_map)

    def parameter_count(self) -> int:
        return sum(self.info(n).numel for n in self.weight_map)


def _short(values: list[int]) -> str:
    return ", ".join(map(str, values[:8])) + (", …" if len(values) > 8 else "")


def _read_config(root: Path) -> tuple[dict[str, Any], str]:
    check_within(root, root / "config.json", "the model config")
    config, raw = read_json(root / "config.json", "the model config")
    if not isinstance(config, dict):
        raise InputError(f"{root / 'config.json'}: not a JSON object")
    for key, kind, what in _CONFIG_TYPES:
        value = config.get(key)
        if value is not None and not _is_kind(value, kind):
            raise InputError(f"{root / 'config.json'}: {key} is {_short_json(value)}, not {what}")
    return config, hashlib.sha256(raw).hexdigest()


# Standard transformers config fields whose type the readers rely on (null means "absent" for each).
_CONFIG_TYPES: tuple[tuple[str, type, str], ...] = (
    ("model_type", str, "a string"),
    ("architectures", list, "a list of class names"),
    ("quantization_config", dict, "an object"),
    ("hidden_size", int, "an integer"),
    ("tie_word_embeddings", bool, "true or false"),
    ("use_sliding_window", bool, "true or false"),
    ("sliding_window", int, "an integer"),
    ("max_window_layers", int, "an integer"),
)


def _is_kind(value: Any, kind: type) -> bool:
    if kind is int:  # bool is an int subclass in Python, but `true` is not a size
        return type(value) is int
    if kind is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, kind)


def _short_json(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _read_provenance(root: Path) -> Provenance | None:
    path = root / PROVENANCE_NAME
    if not path.exists():
        return None
    check_within(root, path, "the llamapro provenance record")  # nested into the output's record
    record, _ = read_json(path, "the llamapro provenance record")
    try:
        return Provenance.from_json(record)
    except RecordError as e:
        raise InputError(f"{path}: {e}") from e


def _read_weights(root: Path) -> Weights:
    index_path = root / INDEX_NAME
    single = root / SINGLE_NAME
    if index_path.exists() and single.exists():
        # transformers loads model.safetensors and ignores the index; one of the two is stale, and
        # guessing which would make expand and the loader disagree about what the model is.
        raise InputError(
            f"{root}: both {SINGLE_NAME} and {INDEX_NAME}; transformers would load only {SINGLE_NAME}",
            hint="remove the stale one",
        )
    if index_path.exists():
        return _read_sharded(root, index_path)
    if single.exists():
        if not single.is_file():
            raise InputError(f"{single} is not a regular file")
        check_within(root, single, "the weights")
        header = read_header(single)
        return {SINGLE_NAME: header}, dict.fromkeys(header.tensors, SINGLE_NAME), False, {}
    _refuse_other_formats(root)
    raise InputError(f"{root}: no {SINGLE_NAME} or {INDEX_NAME}")


def _refuse_other_formats(root: Path) -> None:
    pickles = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.pt*"))
    if pickles:
        raise UnsupportedError(
            f"{root}: only pickle weights ({', '.join(pickles[:3])}); llamapro never unpickles files",
            hint="convert to safetensors first (transformers: save_pretrained(..., safe_serialization=True))",
        )
    others = sorted(p.name for p in root.glob("*.safetensors"))
    if others:
        raise InputError(
            f"{root}: safetensors files ({', '.join(others[:3])}) but no {SINGLE_NAME} or {INDEX_NAME}"
        )


def _read_sharded(
    root: Path, index_path: Path
) -> tuple[dict[str, Header], dict[str, str], bool, dict[str, Any]]:
    check_within(root, index_path, "the shard index")
    index, _ = read_json(index_path, "the shard index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f"{index_path}: no weight_map object of tensor name -> shard file")
    headers: dict[str, Header] = {}
    for shard in dict.fromkeys(weight_map.values()):
        _check_plain_name(index_path, shard)
        shard_path = root / shard
        if not shard_path.exists():
            raise InputError(f"{index_path}: names shard {shard}, which does not exist")
        if not shard_path.is_file():
            raise InputError(f"{index_path}: names shard {shard}, which is not a regular file")
        check_within(root, shard_path, "a shard")
        headers[shard] = read_header(shard_path)
    cross_check(index_path, weight_map, headers)
    meta = index.get("metadata")
    return headers, dict(weight_map), True, dict(meta) if isinstance(meta, Mapping) else {}


def _check_plain_name(index_path: Path, name: str) -> None:
    if not name or name != Path(name).name or name in (".", "..") or "\\" in name:
        raise InputError(f"{index_path}: shard name {name!r} is not a plain file name inside the folder")


def cross_check(index_path: Path, weight_map: Mapping[str, str], headers: Mapping[str, Header]) -> None:
    seen: dict[str, str] = {}
    for shard, header in headers.items():  # duplicates first: they make the index ambiguous
        for name in header.tensors:
            if name in seen:
                raise InputError(
                    f"{index_path.parent}: tensor {name} appears in both {seen[name]} and {shard}"
                )
            seen[name] = shard
    for shard, header in headers.items():
        for name in header.tensors:
            if weight_map.get(name) != shard:
                raise InputError(f"{index_path}: tensor {name} is in {shard} but the index does not say so")
    for name, shard in weight_map.items():
        if name not in headers[shard].tensors:
            raise InputError(f"{index_path}: names tensor {name} in {shard}, which does not contain it")
