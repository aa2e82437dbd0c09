"""`relayer()`: any layer map (repeat, drop, reorder, zeroed copies) into a new, complete model folder.

Owns turning `relayer`'s options into a `layers` plan: `--layers SPEC` (`layer_map`), `--drop I,J` (every
layer but those) and `--drop-new` (every layer but the zeroed copies the input's `llamapro.json` says its
last run added: undoing an untrained expansion gives back the base's tensors byte for byte).
`surgery.execute` does the rest, exactly as for `expand`; the config's per-layer fields are remapped so
each output layer behaves like its source, and a map the family's config cannot express is refused
(`architectures/rewrite.py`) before a byte is written. A map that drops exactly what the last run added
also gets the base's config.json back (`base_config`): the record's `config_replaced` values put back,
accepted only when the recorded run, replayed on them, gives exactly the input's config.json.

Invariant: exactly one of the three map options makes the plan; the input is never modified; the base's
config values are written only when they provably are the base's of this very config.json.
Must not: print, import torch or transformers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from llamapro_cli.architectures.registry import family_for, num_layers
from llamapro_cli.architectures.rewrite import rewrite_config
from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.config_replaced import ReplacedKeys, put_back, replaced_keys, same
from llamapro_cli.errors import InputError, LlamaproError, UsageError
from llamapro_cli.io.files import PROVENANCE_NAME
from llamapro_cli.layer_map import Entry, parse_drop, parse_spec
from llamapro_cli.plan import ExpansionPlan, plan_map
from llamapro_cli.surgery import ExpandReport, Progress, execute, open_source

MAP_OPTIONS = "choose one of --layers SPEC, --drop I,J or --drop-new"


def relayer(
    source: str | Path | Checkpoint,
    out: str | Path,
    *,
    layers: str | None = None,
    drop: str | Sequence[int] | None = None,
    drop_new: bool = False,
    revision: str | None = None,
    max_shard_size: str | int = "5GB",
    digests: bool = False,
    dry_run: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    command: str | None = None,
    hub_repo_id: str | None = None,
) -> ExpandReport:
    """Write `source` with its layers laid out by one of `layers` (a SPEC such as `0-23,8-31`), `drop`
    (`"10,11"` or `[10, 11]`) or `drop_new` into `out`. Same output, atomicity and exit codes as `expand`.
    """
    started = time.monotonic()
    given = [
        name
        for name, on in (
            ("--layers", layers is not None),
            ("--drop", drop is not None),
            ("--drop-new", drop_new),
        )
        if on
    ]
    if len(given) != 1:
        message = f"{' and '.join(given)} conflict" if given else "relayer needs a layer map"
        raise UsageError(message, hint=MAP_OPTIONS + ", e.g. --layers 0-23,8-31")
    ckpt, out_path = open_source(source, out, revision)
    plan = relayer_plan(ckpt, layers=layers, drop=drop, drop_new=drop_new)
    config, warning = base_config(ckpt, plan)
    if warning:
        plan = replace(plan, warnings=(*plan.warnings, warning))
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
        config=config,
    )


def relayer_plan(
    ckpt: Checkpoint,
    *,
    layers: str | None = None,
    drop: str | Sequence[int] | None = None,
    drop_new: bool = False,
) -> ExpansionPlan:
    """The `layers` plan of one map option on this checkpoint."""
    n = ckpt.num_layers
    if layers is not None:
        entries = parse_spec(layers, n)
    elif drop is not None:
        dropped = set(parse_drop(drop if isinstance(drop, str) else ",".join(map(str, drop)), n))
        entries = tuple((i, False) for i in range(n) if i not in dropped)
    else:
        entries = _without_new_layers(ckpt)
    warnings = []
    if entries == tuple((i, False) for i in range(n)):
        warnings.append(f"the map keeps all {n} layers as they are: the output is a copy of the input")
    return plan_map(n, entries, warnings)


def _without_new_layers(ckpt: Checkpoint) -> tuple[Entry, ...]:
    """Every layer but the zeroed copies the record's newest generation added (`--drop-new`)."""
    where = ckpt.root / PROVENANCE_NAME
    record = ckpt.provenance
    if record is None:
        raise InputError(
            f"{ckpt.root}: no {PROVENANCE_NAME}, so nothing records which layers an expansion added",
            hint="name the layers to drop: --drop I,J (llamapro inspect shows which layers look like copies)",
        )
    try:
        plan = record.expansion_plan()
    except ValueError as e:
        raise InputError(f"{where}: malformed layer record ({e})") from e
    if plan.num_layers_out != ckpt.num_layers:
        raise InputError(f"{where} describes {plan.num_layers_out} layers, config.json has {ckpt.num_layers}")
    new = set(plan.new_indices)
    if not new:
        raise InputError(
            f"{where}: the run that made this checkpoint added no zeroed copy: nothing to drop",
            hint="name the layers to drop: --drop I,J",
        )
    return tuple((j, False) for j in range(ckpt.num_layers) if j not in new)


def base_config(ckpt: Checkpoint, plan: ExpansionPlan) -> tuple[dict[str, Any] | None, str | None]:
    """The config.json of the input's base when `plan` drops exactly the copies the input's last run
    added to it (`--drop-new`, or the same map spelled otherwise); None where the plan is another map
    or nothing proves the values, with a warning when the config keeps the rewrite's explicit form."""
    record = ckpt.provenance
    try:
        made = None if record is None else record.expansion_plan()
    except ValueError:
        return None, None  # `--drop-new` says so; any other map does not need the record
    if record is None or made is None or not made.is_identity_map or made.num_layers_out != ckpt.num_layers:
        return None, None
    new = set(made.new_indices)
    if [(x.source, x.identity) for x in plan.layers] != [
        (j, False) for j in range(ckpt.num_layers) if j not in new
    ]:
        return None, None
    family = ckpt.family
    undone, _ = rewrite_config(family, ckpt.config, plan)
    kept = replaced_keys(undone, ckpt.config, family.config_path, family.count_key)
    keys = ", ".join(sorted({key for e in kept for key in (*(k for k, _ in e.values), *e.absent)}))
    where = ckpt.root / PROVENANCE_NAME
    if not record.config_replaced:
        why = f"{where} does not record the base's config values (an older llamapro wrote it)"
        return None, _explicit(why, keys) if keys else None
    config = _replayed(ckpt, made, record.config_replaced)
    if config is None:
        why = (
            f"{where}: the base config values it records, replayed through its expansion, do not give "
            "this config.json (edited since?)"
        )
        return None, _explicit(why, keys or "the per-layer fields")
    return config, None


def _replayed(
    ckpt: Checkpoint, made: ExpansionPlan, replaced: Sequence[ReplacedKeys]
) -> dict[str, Any] | None:
    """The recorded values put back into the input's config, when the recorded run turns them into
    exactly the input's config.json again (None otherwise): the base's config, provably."""
    family = ckpt.family
    try:
        config = put_back(ckpt.config, replaced)
        sub = family.sub_config(config)
        if isinstance(sub, dict) and family.count_key in sub:
            sub[family.count_key] = made.num_layers_in
        if family_for(config).name != family.name or num_layers(family, config) != made.num_layers_in:
            return None
        replay, _ = rewrite_config(family, config, made)
    except (ValueError, LlamaproError):
        return None
    return config if same(replay, ckpt.config) else None


def _explicit(why: str, keys: str) -> str:
    return (
        f"{why}: {keys} are remapped as they stand, so per-layer fields the base left to a formula stay "
        "explicit (the same per-layer behaviour, not necessarily the base's config.json)"
    )
