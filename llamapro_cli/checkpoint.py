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
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .architectures import Family, family_for, num_layers
from .errors import InputError, UnsupportedError
from .safetensors_io import Header, TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PROVENANCE_NAME = "llamapro.json"
# What a hub download needs: weights, config, index, provenance, and the files `expand` carries over.
HUB_ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
    "*.md",
    "LICENSE*",
    "NOTICE*",
    "USE_POLICY*",
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
    provenance: dict[str, Any] | None = None
    repo_id: str | None = None
    revision: str | None = None
    index_metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, source: str | Path, *, revision: str | None = None) -> Checkpoint:
        root, repo_id = resolve(source, revision=revision)
        config, config_sha = _read_config(root)
        family = family_for(config)
        count = num_layers(family, config)
        if count is None or count < 1:
            raise InputError(f"{root / 'config.json'}: no valid {family.count_key} (the layer count)")
        headers, weight_map, sharded, index_meta = _read_weights(root)
        ckpt = cls(
            root=root,
            config=config,
            config_sha256=config_sha,
            family=family,
            num_layers=count,
            headers=headers,
            weight_map=weight_map,
            sharded=sharded,
            provenance=_read_provenance(root),
            repo_id=repo_id,
            revision=revision if repo_id else None,
            index_metadata=index_meta,
        )
        ckpt.check_layers()
        return ckpt

    def info(self, name: str) -> TensorInfo:
        return self.headers[self.weight_map[name]].tensors[name]

    def location(self, name: str) -> tuple[Path, int]:
        """(shard path, absolute byte offset) of a tensor's data."""
        header = self.headers[self.weight_map[name]]
        return header.path, header.absolute_range(name)[0]

    def tensor_names(self) -> list[str]:
        """Every tensor, in shard order then file order."""
        return [name for header in self.headers.values() for name in header.tensors]

    def split_blocks(self) -> tuple[dict[int, list[str]], list[str]]:
        """Block tensors by layer index (block-relative names, file order) and the non-block tensors."""
        regex = self.family.block_regex()
        blocks: dict[int, list[str]] = {}
        other: list[str] = []
        for name in self.tensor_names():
            m = regex.match(name)
            if m:
                blocks.setdefault(int(m.group(1)), []).append(m.group(2))
            else:
                other.append(name)
        return blocks, other

    def check_layers(self) -> None:
        blocks, _ = self.split_blocks()
        expected = set(range(self.num_layers))
        found = set(blocks)
        where = self.root / "config.json"
        if found != expected:
            missing = sorted(expected - found)
            extra = sorted(found - expected)
            detail = f"missing layers {_short(missing)}" if missing else f"extra layers {_short(extra)}"
            raise InputError(
                f"{where}: {self.family.count_key} is {self.num_layers} but the weights have "
                f"{len(found)} layers under {self.family.layer_prefix} ({detail})"
            )
        for index in sorted(blocks):
            for pattern in self.family.required:
                if not any(re.fullmatch(pattern, rel) for rel in blocks[index]):
                    raise InputError(
                        f"layer {index} has no tensor matching {self.family.layer_prefix}{index}."
                        f"{pattern.replace(chr(92), '')} ({self.family.name} needs it in every layer)"
                    )

    def total_bytes(self) -> int:
        return sum(self.info(n).nbytes for n in self.weight_map)

    def parameter_count(self) -> int:
        return sum(self.info(n).numel for n in self.weight_map)


def _short(values: list[int]) -> str:
    return ", ".join(map(str, values[:8])) + (", …" if len(values) > 8 else "")


def resolve(source: str | Path, *, revision: str | None = None) -> tuple[Path, str | None]:
    """A local folder, or a hub repo id resolved to its snapshot folder (downloaded when online)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve(), None
    if path.exists():
        raise InputError(f"{path} is a file; expected a checkpoint folder or a hub repo id")
    text = str(source)
    if not _REPO_ID.match(text) or text.startswith((".", "/", "~")):
        raise InputError(f"{path}: no such folder", hint="give a checkpoint folder or a hub repo id org/name")
    return _snapshot(text, revision), text


def _snapshot(repo_id: str, revision: str | None) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS
        )
    except LocalEntryNotFoundError as e:
        raise InputError(
            f"{repo_id}: not in the local hub cache and the hub cannot be reached",
            hint="download it first (hf download) or unset HF_HUB_OFFLINE",
        ) from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise InputError(f"{repo_id}: cannot resolve on the hub: {_first_line(e)}") from e
    return Path(folder)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _read_json(path: Path, what: str) -> Any:
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise InputError(f"{path}: {what} is missing") from e
    except OSError as e:
        raise InputError(f"{path}: cannot read {what}: {os.strerror(e.errno or 0)}") from e
    try:
        return json.loads(data), data
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: {what} is not valid JSON ({e})") from e


def _read_config(root: Path) -> tuple[dict[str, Any], str]:
    config, raw = _read_json(root / "config.json", "config.json")
    if not isinstance(config, dict):
        raise InputError(f"{root / 'config.json'}: not a JSON object")
    return config, hashlib.sha256(raw).hexdigest()


def _read_provenance(root: Path) -> dict[str, Any] | None:
    path = root / PROVENANCE_NAME
    if not path.exists():
        return None
    record, _ = _read_json(path, "the llamapro provenance record")
    if not isinstance(record, dict) or not isinstance(record.get("schema_version"), int):
        raise InputError(f"{path}: not a llamapro provenance record (no schema_version)")
    return record


def _read_weights(root: Path) -> tuple[dict[str, Header], dict[str, str], bool, dict[str, Any]]:
    index_path = root / INDEX_NAME
    if index_path.exists():
        return _read_sharded(root, index_path)
    single = root / SINGLE_NAME
    if single.exists():
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
    index, _ = _read_json(index_path, "the shard index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f"{index_path}: no weight_map object of tensor name -> shard file")
    headers: dict[str, Header] = {}
    for shard in dict.fromkeys(weight_map.values()):
        _check_plain_name(index_path, shard)
        shard_path = root / shard
        if not shard_path.is_file():
            raise InputError(f"{index_path}: names shard {shard}, which does not exist")
        headers[shard] = read_header(shard_path)
    _cross_check(index_path, weight_map, headers)
    meta = index.get("metadata")
    return headers, dict(weight_map), True, dict(meta) if isinstance(meta, Mapping) else {}


def _check_plain_name(index_path: Path, name: str) -> None:
    if not name or name != Path(name).name or name in (".", "..") or "\\" in name:
        raise InputError(f"{index_path}: shard name {name!r} is not a plain file name inside the folder")


def _cross_check(index_path: Path, weight_map: Mapping[str, str], headers: Mapping[str, Header]) -> None:
    seen: dict[str, str] = {}
    for shard, header in headers.items():
        for name in header.tensors:
            if name in seen:
                raise InputError(f"tensor {name} appears in both {seen[name]} and {shard}")
            seen[name] = shard
            if weight_map.get(name) != shard:
                raise InputError(f"{index_path}: tensor {name} is in {shard} but the index does not say so")
    for name, shard in weight_map.items():
        if name not in headers[shard].tensors:
            raise InputError(f"{index_path}: names tensor {name} in {shard}, which does not contain it")
