"""Execute a layer plan: byte surgery from input shards into a new, complete model folder.

The one execution path of `expand` and `relayer`: they differ only in how they make the plan. Every
output tensor is either a byte range of an input shard (a kept, repeated or copied layer, a non-block
tensor) or zeros (the branch-final tensors of a zeroed copy); a dropped layer's tensors are not written.
Nothing is decoded, so any dtype works and memory stays at the size of the headers. The output is
written into a temporary sibling folder `<out>.partial-<random>` (with a marker naming the pid) and
renamed into place only when complete; any error, SIGINT, SIGTERM or SIGHUP removes it. Each source
shard is opened once per run (`io.sources`): a shard replaced or rewritten while the run reads it stops
the run (exit 3). Config, index, provenance (`llamapro.json`), model card and carried files come along.

Invariant: the input is only ever opened read-only; the output either appears complete or not at all;
everything that can be refused (the plan, the config, the headers) is refused before the first byte.
Must not: print, import torch or transformers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llamapro_cli.architectures.registry import renumber_extra
from llamapro_cli.architectures.rewrite import rewrite_config
from llamapro_cli.card import CardFacts, read_card_source, write_model_card
from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.companions import carried_size, carry, companions
from llamapro_cli.config_replaced import replaced_keys
from llamapro_cli.errors import InputError
from llamapro_cli.folder import within_checkpoint
from llamapro_cli.io.files import INDEX_NAME, PROVENANCE_NAME
from llamapro_cli.io.header import OutTensor, header_bytes
from llamapro_cli.io.outdir import atomic_output, check_disjoint, free_space
from llamapro_cli.io.sources import SourceFiles
from llamapro_cli.io.writer import space_needed, write_shard
from llamapro_cli.plan import ExpansionPlan, NewLayer, PlanKind
from llamapro_cli.provenance import (
    ALGORITHM,
    LAYERS_SCHEMA_VERSION,
    SCHEMA_VERSION,
    Digests,
    PlanRecord,
    Provenance,
    SourceRecord,
)
from llamapro_cli.shards import (
    Shards,
    ShardSummary,
    parse_size,
    sha256_json,
    split_shards,
    write_index,
    write_json,
)
from llamapro_cli.version import __version__

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True)
class ExpandReport:
    """What `expand` or `relayer` did (or, with dry_run, would do). `--json` prints exactly this."""

    source: str
    out: str
    dry_run: bool
    architecture: str
    num_layers_in: int
    num_layers_out: int
    plan: dict[str, Any]
    layers: tuple[NewLayer, ...]
    shards: tuple[ShardSummary, ...]
    total_size: int
    bytes_to_write: int
    zeroed: int
    parameters_in: int
    parameters_out: int
    carried: tuple[str, ...]
    not_copied: tuple[str, ...]
    warnings: tuple[str, ...]
    free_space: int | None  # None: the filesystem reports no capacity (ramfs), so it is unknown
    digests: bool
    seconds: float


def open_source(
    source: str | Path | Checkpoint, out: str | Path, revision: str | None
) -> tuple[Checkpoint, Path]:
    """The input checkpoint and the absolute output path, the two checked disjoint before a byte is read."""
    out_path = Path(out).expanduser().absolute()
    local = None if isinstance(source, Checkpoint) else Path(source).expanduser()
    if local is not None and local.is_dir():
        check_disjoint(local, out_path)  # before a byte is read: no input file may lead into --out
    ckpt = source if isinstance(source, Checkpoint) else Checkpoint.open(source, revision=revision)
    return ckpt, out_path


def execute(
    ckpt: Checkpoint,
    plan: ExpansionPlan,
    out_path: Path,
    *,
    started: float,
    max_shard_size: str | int = "5GB",
    digests: bool = False,
    dry_run: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    command: str | None = None,
    hub_repo_id: str | None = None,
    config: dict[str, Any] | None = None,
) -> ExpandReport:
    """Write `plan` applied to `ckpt` into `out_path` (or, with `dry_run`, only say what would be written).

    `started`: the caller's `time.monotonic()` when it began (the report's time includes the plan).
    `hub_repo_id`: the repo the output will be pushed to, so the model card's commands name it.
    `config`: the config.json to write instead of the rewrite's (`relayer`'s exact undo of an
    expansion); the rewrite still runs, so its refusals and warnings stand.
    """
    check_disjoint(ckpt.root, out_path)  # the folder a repo id resolved to, too (hub cache links)
    job = prepare(ckpt, plan, out_path, parse_size(max_shard_size), command, config)
    notes: list[str] = []  # leftovers of killed runs found beside --out (outdir's sweep)
    engines: dict[str, str] = {}  # shard name -> the engine that wrote it
    if not dry_run:
        # On a filesystem that shares extents, only what the clone engine writes needs free space.
        need = space_needed([ts for _, ts in job.shards], job.metadata(), out_path.parent)
        need += carried_size(job.ckpt.root, job.carried)
        with atomic_output(out_path, force=force, need_bytes=need, notes=notes.append) as tmp:
            engines = _write(job, tmp, digests=digests, progress=progress)
            write_model_card(tmp / "README.md", _card_facts(job, digests=digests, hub_repo_id=hub_repo_id))
    seconds = time.monotonic() - started
    report = job.report(dry_run=dry_run, digests=digests and not dry_run, seconds=seconds, engines=engines)
    return replace(report, warnings=report.warnings + tuple(notes)) if notes else report


@dataclass(frozen=True)
class Job:
    """Everything decided before the first byte is written."""

    ckpt: Checkpoint
    plan: ExpansionPlan
    out: Path
    config: dict[str, Any]
    shards: Shards
    zeroed: tuple[str, ...]
    carried: tuple[str, ...]
    not_copied: tuple[str, ...]
    warnings: tuple[str, ...]
    command: str | None
    card_source: str | None  # the input's README.md text, when it is merged into the model card

    @property
    def bytes_to_write(self) -> int:
        return sum(t.nbytes for _, tensors in self.shards for t in tensors if t.source is not None)

    def metadata(self) -> dict[str, str]:
        return job_metadata(self.ckpt, self.plan)

    def report(
        self, *, dry_run: bool, digests: bool, seconds: float, engines: dict[str, str]
    ) -> ExpandReport:
        meta = self.metadata()
        shard_reports = tuple(
            ShardSummary(
                name,
                len(ts),
                len(header_bytes(ts, meta, None)) + sum(t.nbytes for t in ts),
                engines.get(name),
            )
            for name, ts in self.shards
        )
        return ExpandReport(
            source=self.ckpt.repo_id or str(self.ckpt.root),
            out=str(self.out),
            dry_run=dry_run,
            architecture=self.ckpt.family.name,
            num_layers_in=self.plan.num_layers_in,
            num_layers_out=self.plan.num_layers_out,
            plan=self.plan.to_record(),
            layers=self.plan.layers,
            shards=shard_reports,
            total_size=sum(s.bytes for s in shard_reports),
            bytes_to_write=self.bytes_to_write,
            zeroed=len(self.zeroed),
            parameters_in=self.ckpt.parameter_count(),
            parameters_out=sum(_numel(t.shape) for _, ts in self.shards for t in ts),
            carried=self.carried,
            not_copied=self.not_copied,
            warnings=self.warnings,
            free_space=free_space(self.out),
            digests=digests,
            seconds=round(seconds, 3),
        )


def job_metadata(ckpt: Checkpoint, plan: ExpansionPlan) -> dict[str, str]:
    """Each output shard's `__metadata__`: the source's string entries plus our few keys."""
    first = next(iter(ckpt.headers.values()))
    meta = {k: v for k, v in first.metadata.items() if not k.startswith("llamapro")}
    meta.setdefault("format", "pt")  # transformers 4 refuses shards without it
    meta["llamapro_version"] = __version__
    meta["llamapro_layers"] = f"{plan.num_layers_in}->{plan.num_layers_out}"
    meta["llamapro_provenance_sha256"] = "0" * 64  # placeholder of the real length, set in _write
    return meta


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _card_facts(job: Job, *, digests: bool, hub_repo_id: str | None) -> CardFacts:
    ckpt = job.ckpt
    return CardFacts(
        name=hub_repo_id.split("/")[-1] if hub_repo_id else job.out.name,
        model_ref=hub_repo_id or f"./{job.out.name}",
        source=ckpt.repo_id or str(ckpt.root),
        base_model=ckpt.repo_id,
        revision=ckpt.revision,
        architecture=ckpt.family.name,
        command=job.command,
        plan=job.plan,
        parameters_in=ckpt.parameter_count(),
        parameters_out=sum(_numel(t.shape) for _, ts in job.shards for t in ts),
        digests=digests,
        original=job.card_source,
    )


def prepare(
    ckpt: Checkpoint,
    plan: ExpansionPlan,
    out: Path,
    max_shard: int,
    command: str | None,
    config: dict[str, Any] | None = None,
) -> Job:
    rewritten, config_warnings = rewrite_config(ckpt.family, ckpt.config, plan)
    tensors, zeroed = _tensor_ops(ckpt, plan)
    shards = split_shards(tensors, max_shard)
    found = companions(ckpt.root)
    readme = ckpt.root / "README.md"
    inside = readme.is_file() and within_checkpoint(ckpt.root, readme)
    card_source, card_warnings = read_card_source(readme) if inside else (None, [])
    _check_headers(shards, job_metadata(ckpt, plan), out)
    return Job(
        ckpt=ckpt,
        plan=plan,
        out=out,
        config=rewritten if config is None else config,
        shards=shards,
        zeroed=tuple(zeroed),
        carried=found.carried,
        not_copied=found.not_copied,
        warnings=plan.warnings + tuple(config_warnings) + found.warnings + tuple(card_warnings),
        command=command,
        card_source=card_source,
    )


def _check_headers(
    shards: tuple[tuple[str, tuple[OutTensor, ...]], ...], meta: dict[str, str], out: Path
) -> None:
    """Every output header within the safetensors size cap, before a byte is written (and in a dry run)."""
    for name, tensors in shards:
        try:
            header_bytes(tensors, meta, None)
        except InputError as e:
            raise InputError(f"{out / name}: {e.message}", hint=e.hint) from e


def _tensor_ops(ckpt: Checkpoint, plan: ExpansionPlan) -> tuple[list[OutTensor], list[str]]:
    """Output tensors in layer order: leading non-block tensors, blocks 0..n-1, trailing ones."""
    blocks, other = ckpt.split_blocks()
    order = {name: i for i, name in enumerate(ckpt.tensor_names())}
    non_block = set(other)
    first_block = min((i for name, i in order.items() if name not in non_block), default=0)
    lead = [n for n in other if order[n] < first_block]
    tail = [n for n in other if order[n] >= first_block]
    n_in, n_out = plan.num_layers_in, plan.num_layers_out
    # MTP layers past the blocks move up with them (renumber_extra leaves every other name alone).
    out: list[OutTensor] = [_copy(ckpt, n, renumber_extra(ckpt.family, n, n_in, n_out)) for n in lead]
    zeroed: list[str] = []
    prefix = ckpt.family.layer_prefix
    for layer in plan.layers:
        for rel in blocks[layer.source]:
            dst = f"{prefix}{layer.index}.{rel}"
            if layer.identity and ckpt.family.is_zeroed(rel):
                info = ckpt.info(f"{prefix}{layer.source}.{rel}")
                out.append(OutTensor(dst, info.dtype, info.shape))
                zeroed.append(dst)
            else:
                out.append(_copy(ckpt, f"{prefix}{layer.source}.{rel}", dst))
    out.extend(_copy(ckpt, n, renumber_extra(ckpt.family, n, n_in, n_out)) for n in tail)
    return out, zeroed


def _copy(ckpt: Checkpoint, src: str, dst: str) -> OutTensor:
    info = ckpt.info(src)
    path, offset = ckpt.location(src)
    return OutTensor(dst, info.dtype, info.shape, source=path, offset=offset)


def _write(job: Job, tmp: Path, *, digests: bool, progress: Progress | None) -> dict[str, str]:
    total = job.bytes_to_write + sum(t.nbytes for _, ts in job.shards for t in ts if t.source is None)
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    meta = job.metadata()
    record = _provenance(job)
    meta["llamapro_provenance_sha256"] = sha256_json(record.to_json())
    hashes: dict[str, str] = {}
    engines: dict[str, str] = {}
    known: dict[tuple[Path, int, int], str] = {}  # each source range is hashed once, for every shard
    stamps = {h.path: h.stamp for h in job.ckpt.headers.values() if h.stamp is not None}
    with SourceFiles(stamps) as sources:
        sources.open_all()  # each source once per run: the very files whose headers were read
        for name, tensors in job.shards:
            # align=None: header padded so that copied bytes keep their source's block phase (cloned,
            # or read straight into place by the direct-I/O engine).
            written = write_shard(
                tmp / name,
                tensors,
                meta,
                digests=digests,
                progress=step,
                align=None,
                known=known,
                sources=sources,
            )
            hashes.update(written.digests)
            engines[name] = written.engine.value
            sources.verify()  # a source changed during this shard: stop before anything is published
    if len(job.shards) > 1:
        write_index(tmp / INDEX_NAME, job.shards)
    write_json(tmp / "config.json", job.config)
    if digests:
        record = replace(record, digests=Digests(ALGORITHM, hashes))
    write_json(tmp / PROVENANCE_NAME, record.to_json())
    for name in job.carried:
        carry(job.ckpt.root, job.ckpt.root / name, tmp / name)
    return engines


def _provenance(job: Job) -> Provenance:
    ckpt, plan = job.ckpt, job.plan
    return Provenance(
        # v1 bytes for every/after/add plans, as ever; a layer map's record is v2 (provenance.py).
        schema_version=LAYERS_SCHEMA_VERSION if plan.kind is PlanKind.LAYERS else SCHEMA_VERSION,
        tool=f"llamapro {__version__}",
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        command=job.command,
        source=SourceRecord(
            path=None if ckpt.repo_id else str(ckpt.root),
            repo_id=ckpt.repo_id,
            revision=ckpt.revision,
            config_sha256=ckpt.config_sha256,
            architecture=ckpt.family.name,
            num_layers=ckpt.num_layers,
        ),
        plan=PlanRecord.of(plan),
        layer_prefix=ckpt.family.layer_prefix,
        num_layers=plan.num_layers_out,
        layers=plan.layers,
        zeroed=job.zeroed,
        config_replaced=replaced_keys(
            ckpt.config, job.config, ckpt.family.config_path, ckpt.family.count_key
        ),
        parent=ckpt.provenance,
    )
