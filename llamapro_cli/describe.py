"""`describe_checkpoint()`: what a checkpoint is, from its config and headers alone (for `inspect`).

Kept apart from `checkpoint.py` so that module stays about loading and validation. Invariant: reads
headers only, never tensor data; returns a frozen report whose `asdict` is the `--json` document.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamapro_cli.architectures.layers import layer_kinds, pattern_warnings
from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.provenance import Provenance
from llamapro_cli.shards import ShardSummary


@dataclass(frozen=True)
class Expansion:
    """How the checkpoint was expanded, from its `llamapro.json`."""

    tool: str
    source: str | None
    num_layers_in: int
    plan: dict[str, Any]
    new_layers: tuple[int, ...]
    sources: tuple[int, ...]
    digests: bool
    generations: int  # 1 + number of nested parent records


@dataclass(frozen=True)
class InspectReport:
    path: str
    repo_id: str | None
    architecture: str
    model_type: str
    architectures: tuple[str, ...]
    num_layers: int
    hidden_size: int | None
    layer_prefix: str
    layer_kinds: tuple[str, ...] | None
    dtypes: dict[str, int]  # dtype -> parameter count
    shards: tuple[ShardSummary, ...]
    tensors: int
    parameters: int
    parameters_per_layer: tuple[int, ...]
    parameters_outside_layers: int
    total_bytes: int
    tied_embeddings: bool
    quantization: str | None
    expanded: Expansion | None
    warnings: tuple[str, ...] = ()  # e.g. a layer pattern engines re-derive from the index


def describe_checkpoint(source: str | Path | Checkpoint, *, revision: str | None = None) -> InspectReport:
    """A folder's headers, or a hub repo's read over HTTP (no weights downloaded; the cache offline)."""
    ckpt = source if isinstance(source, Checkpoint) else _open(source, revision)
    family = ckpt.family
    sub = family.sub_config(ckpt.config)
    per_layer = [0] * ckpt.num_layers
    dtypes: Counter[str] = Counter()
    outside = 0
    for name in ckpt.weight_map:
        info = ckpt.info(name)
        dtypes[info.dtype] += info.numel
        layer = family.layer_of(name)
        if layer is not None and layer < ckpt.num_layers:
            per_layer[layer] += info.numel
        else:
            outside += info.numel
    kinds = layer_kinds(family, ckpt.config)
    qc = ckpt.config.get("quantization_config")
    return InspectReport(
        path=str(ckpt.root),
        repo_id=ckpt.repo_id,
        architecture=family.name,
        model_type=str(ckpt.config.get("model_type")),
        architectures=tuple(ckpt.config.get("architectures") or ()),
        num_layers=ckpt.num_layers,
        hidden_size=sub.get("hidden_size"),
        layer_prefix=family.layer_prefix,
        layer_kinds=tuple(kinds) if kinds else None,
        dtypes=dict(dtypes.most_common()),
        shards=tuple(ShardSummary(name, len(h.tensors), h.file_size) for name, h in ckpt.headers.items()),
        tensors=len(ckpt.weight_map),
        parameters=sum(per_layer) + outside,
        parameters_per_layer=tuple(per_layer),
        parameters_outside_layers=outside,
        total_bytes=ckpt.total_bytes(),
        tied_embeddings=_tied(ckpt),
        quantization=str(qc.get("quant_method")) if isinstance(qc, dict) else None,
        expanded=_expansion(ckpt.provenance),
        warnings=tuple(pattern_warnings(family, ckpt.config)),
    )


def _open(source: str | Path, revision: str | None) -> Checkpoint:
    if Path(source).expanduser().is_dir():
        return Checkpoint.open(source, revision=revision)
    from llamapro_cli.hub import open_for_inspect  # imports huggingface_hub: only for repo ids

    return open_for_inspect(source, revision=revision)


def _tied(ckpt: Checkpoint) -> bool:
    sub = ckpt.family.sub_config(ckpt.config)
    tied = sub.get("tie_word_embeddings", ckpt.config.get("tie_word_embeddings"))
    has_head = any(name in ckpt.weight_map for name in ckpt.family.roles.head)
    return bool(tied) or not has_head


def _expansion(record: Provenance | None) -> Expansion | None:
    if record is None:
        return None
    return Expansion(
        tool=str(record.tool),
        source=record.source.repo_id or record.source.path,
        num_layers_in=record.source.num_layers,
        plan=record.plan.to_json(),
        new_layers=record.new_layers,
        sources=tuple(x.source for x in record.layers if x.identity),
        digests=record.digests is not None,
        generations=len(list(record.generations())),
    )
