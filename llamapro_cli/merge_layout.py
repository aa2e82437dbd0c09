"""Where every tensor of a merged checkpoint comes from and which shard it goes to, before any byte moves.

`plan_layout(ckpt, layer_replication, max_shard)` returns a `Layout`: output shards of `OutTensor`s that
point at the model's own byte ranges (merge.py swaps in the adapted ones). Without replication the output
mirrors the model (same shard names, same tensor order, the shard metadata kept). With PEFT's
`layer_replication` (`peft/tuners/tuners_utils.py::replicate_layers`: the ranges [start, end) of base
layers, concatenated) output layer j is a byte copy of base layer `map[j]`, tensors in layer order and
split into shards as expand splits them.

Invariant: pure planning over headers: nothing is read or written. Must not: import torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llamapro_cli.architectures.registry import extra_layers
from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.errors import UnsupportedError
from llamapro_cli.io.header import OutTensor
from llamapro_cli.plan import ExpansionPlan, NewLayer, PlanKind
from llamapro_cli.version import __version__


@dataclass(frozen=True)
class OutShard:
    name: str
    tensors: tuple[OutTensor, ...]
    metadata: dict[str, str]


@dataclass(frozen=True)
class Layout:
    """The output's shards, its tensor order, and the layer map (None: the model's own layers)."""

    shards: tuple[OutShard, ...]
    sharded: bool  # write an index even for one shard (the model had one)
    layer_map: tuple[int, ...] | None
    num_layers_in: int
    tensors: dict[str, OutTensor]  # output key -> where its bytes come from, in output order

    @property
    def order(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.tensors)}

    def plan_for_config(self) -> ExpansionPlan:
        """The layer map as an `ExpansionPlan` (repeats marked as copies), for `rewrite_config` only:
        every base layer must appear, first occurrences in order (what PEFT's examples do)."""
        assert self.layer_map is not None
        layers: list[NewLayer] = []
        placed = 0
        for j, source in enumerate(self.layer_map):
            if source < placed:
                layers.append(NewLayer(j, source, True))
            elif source == placed:
                layers.append(NewLayer(j, source, False))
                placed += 1
            else:
                break
        if placed != self.num_layers_in or len(layers) != len(self.layer_map):
            raise UnsupportedError(
                f"layer_replication {list(self.layer_map)} drops or reorders base layers; llamapro "
                "materialises maps that keep every base layer, first uses in order (e.g. [[0, 16], [8, 24], "
                "[16, 32]])"
            )
        return ExpansionPlan.from_layers(self.num_layers_in, layers, kind=PlanKind.AFTER)


def plan_layout(ckpt: Checkpoint, replication: Sequence[tuple[int, int]] | None, max_shard: int) -> Layout:
    if replication is None:
        return _mirror(ckpt)
    layer_map = tuple(i for start, end in replication for i in range(start, end))
    if any(i >= ckpt.num_layers for i in layer_map):
        raise UnsupportedError(
            f"layer_replication {[list(r) for r in replication]} names layers past the model's "
            f"{ckpt.num_layers}; was the adapter trained on this base?"
        )
    if extra_layers(ckpt.family, ckpt.config):
        raise UnsupportedError(
            f"{ckpt.root}: layer_replication with layers past the blocks (MTP) is not supported"
        )
    return _replicated(ckpt, layer_map, max_shard)


def _metadata(ckpt: Checkpoint, shard: str) -> dict[str, str]:
    meta = {k: v for k, v in ckpt.headers[shard].metadata.items() if not k.startswith("llamapro")}
    meta.setdefault("format", "pt")  # transformers 4 refuses shards without it
    meta["llamapro_version"] = __version__
    return meta


def _copy(ckpt: Checkpoint, src: str, dst: str) -> OutTensor:
    info = ckpt.info(src)
    path, offset = ckpt.location(src)
    return OutTensor(dst, info.dtype, info.shape, source=path, offset=offset)


def _mirror(ckpt: Checkpoint) -> Layout:
    shards = tuple(
        OutShard(name, tuple(_copy(ckpt, n, n) for n in header.tensors), _metadata(ckpt, name))
        for name, header in ckpt.headers.items()
    )
    return _layout(ckpt, shards, ckpt.sharded, None)


def _replicated(ckpt: Checkpoint, layer_map: tuple[int, ...], max_shard: int) -> Layout:
    from huggingface_hub import split_state_dict_into_shards_factory

    blocks, other = ckpt.split_blocks()
    order = {name: i for i, name in enumerate(ckpt.tensor_names())}
    first_block = min(
        (order[f"{ckpt.family.layer_prefix}{i}.{r}"] for i in blocks for r in blocks[i]), default=0
    )
    prefix = ckpt.family.layer_prefix
    tensors = [_copy(ckpt, n, n) for n in other if order[n] < first_block]
    for j, source in enumerate(layer_map):
        tensors += [_copy(ckpt, f"{prefix}{source}.{rel}", f"{prefix}{j}.{rel}") for rel in blocks[source]]
    tensors += [_copy(ckpt, n, n) for n in other if order[n] >= first_block]
    by_name = {t.name: t for t in tensors}
    split = split_state_dict_into_shards_factory(
        by_name,
        get_storage_size=lambda t: t.nbytes,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard,
    )
    meta = _metadata(ckpt, next(iter(ckpt.headers)))
    shards = tuple(
        OutShard(name, tuple(by_name[n] for n in names), dict(meta))
        for name, names in split.filename_to_tensors.items()
    )
    return _layout(ckpt, shards, len(shards) > 1, layer_map)


def _layout(
    ckpt: Checkpoint, shards: tuple[OutShard, ...], sharded: bool, layer_map: tuple[int, ...] | None
) -> Layout:
    tensors = {t.name: t for s in shards for t in s.tensors}
    return Layout(shards, sharded, layer_map, ckpt.num_layers, tensors)
