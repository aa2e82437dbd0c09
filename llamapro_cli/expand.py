"""`expand()`: LLaMA Pro block expansion, from options to a plan to a new, complete model folder.

Owns turning `expand`'s options (`--every` / `--after` / `--add`, or `--layers` with an identity map)
into a plan; `surgery.execute` does the rest (the one execution path `relayer` shares: byte surgery,
config, provenance, card, carry-over, atomic output).

Invariant: every plan `expand` executes is an identity map (each original layer once, in order, plus
zeroed copies), so the output computes exactly what the input did.
Must not: print, import torch or transformers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.errors import UsageError
from llamapro_cli.layer_map import identity_problem, parse_spec
from llamapro_cli.plan import ExpansionPlan, Placement, plan_expansion, plan_map, shown
from llamapro_cli.surgery import ExpandReport, Progress, execute, open_source

__all__ = ["ExpandReport", "Progress", "expand"]


def expand(
    source: str | Path | Checkpoint,
    out: str | Path,
    *,
    every: int | None = None,
    copies: int | None = None,
    after: Sequence[int] | None = None,
    add: int | None = None,
    placement: Placement | str = Placement.INTERLEAVE,
    layers: str | None = None,
    revision: str | None = None,
    max_shard_size: str | int = "5GB",
    digests: bool = False,
    dry_run: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    command: str | None = None,
    hub_repo_id: str | None = None,
) -> ExpandReport:
    """Expand a checkpoint folder (or hub repo id) into `out`; see design.md §3 for the plan semantics.

    `layers`: a `relayer` SPEC (`0-3,3z,4-7`) accepted only when it is an identity map that adds a copy.
    `hub_repo_id`: the repo the output will be pushed to, so the model card's commands name it.
    """
    started = time.monotonic()
    ckpt, out_path = open_source(source, out, revision)
    if layers is None:
        plan = plan_expansion(
            ckpt.num_layers, every=every, copies=copies, after=after, add=add, placement=placement
        )
    else:
        others = (("--every", every), ("--copies", copies), ("--after", after), ("--add", add))
        given = [name for name, value in others if value is not None]
        if given or placement != Placement.INTERLEAVE:
            raise UsageError(
                f"--layers and {given[0] if given else '--placement'} conflict",
                hint="--layers alone gives the whole layer map, e.g. --layers 0-3,3z,4-7",
            )
        plan = identity_plan(ckpt.num_layers, layers)
    return execute(
        ckpt,
        plan,
        out_path,
        started=started,
        max_shard_size=max_shard_size,
        digests=digests,
        dry_run=dry_run,
        force=force,
        progress=progress,
        command=command,
        hub_repo_id=hub_repo_id,
    )


def identity_plan(num_layers: int, spec: str) -> ExpansionPlan:
    """`expand --layers SPEC`: the map, when it is an identity map with at least one zeroed copy."""
    entries = parse_spec(spec, num_layers)
    problem = identity_problem(entries, num_layers)
    if problem:
        raise UsageError(
            f"--layers {shown(spec)} is not an identity map ({problem}), so expand cannot write it",
            hint="llamapro relayer --in IN --out OUT --layers SPEC drops, repeats or reorders layers",
        )
    if not any(zeroed for _, zeroed in entries):
        raise UsageError(
            f"--layers {shown(spec)} adds no layer",
            hint="mark the copies with z, e.g. --layers 0-3,3z,4-7 adds a zeroed copy of layer 3",
        )
    return plan_map(num_layers, entries)
