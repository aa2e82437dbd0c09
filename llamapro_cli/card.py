"""The model card `expand` writes as the output's README.md, built with huggingface_hub's `ModelCard`.

The input's card is parsed, its metadata (license, gating `extra_gated_*`, language, tags, datasets, …)
merged into a new `ModelCardData`, and its text kept below a heading. We add what the Hub uses to show
lineage (`base_model`, `base_model_relation`), our tags and `library_name`. The body says how the model
was made: the command, the new layers, the parameter counts, and the commands that check and train it.

The input's card is hostile data like every input file: at most `MAX_CARD_SIZE` bytes of it are read,
and its YAML metadata is merged only when it is at most `MAX_METADATA_SIZE` bytes and expands to at most
`MAX_METADATA_NODES` nodes — YAML aliases can make 400 bytes expand to gigabytes (the "billion laughs").
Otherwise the card keeps the original text without its metadata, and `expand` warns.

Invariant: metadata is only ever produced by `ModelCardData.to_yaml()`, never hand-written YAML, so the
card parses back with `ModelCard`; no YAML is loaded before its expanded size is known to be small.
Must not: print, touch the network, or invent a `base_model` for a local input (the Hub would link to
whatever repo has that name).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamapro_cli.errors import InputError, OutputError
from llamapro_cli.plan import ExpansionPlan, PlanKind, plan_options
from llamapro_cli.version import __version__

TAGS = ("llama-pro", "block-expansion")
RELAYER_TAGS = ("llamapro", "layer-map")
PAPER = "https://arxiv.org/abs/2401.02415"
# Metadata of the original card that describes the original repo, not the expanded one: its own base
# model and relation, its evaluation results (model-index names the original), its successor.
_DROPPED_KEYS = frozenset(
    {"base_model", "base_model_relation", "model-index", "eval_results", "new_version", "library_name"}
)
MAX_CARD_SIZE = 1024 * 1024  # the input's README.md; real ones are kilobytes
MAX_METADATA_SIZE = 64 * 1024  # its YAML header (license, tags, gating, ...): real ones are ~1 KB
MAX_METADATA_NODES = 10_000  # YAML nodes after expanding every alias


@dataclass(frozen=True)
class CardFacts:
    """Everything the card says, gathered by `expand` before the card is rendered."""

    name: str  # the card's title: the output folder's name or the hub repo being pushed to
    model_ref: str  # how commands in the card name the expanded model (./folder or org/name)
    source: str  # the input: hub repo id or absolute folder path
    base_model: str | None  # the input's hub repo id; None for a local folder
    revision: str | None
    architecture: str
    command: str | None
    plan: ExpansionPlan
    parameters_in: int
    parameters_out: int
    digests: bool
    original: str | None  # the input's README.md text, None when it has none


def model_card(facts: CardFacts) -> Any:
    """A `huggingface_hub.ModelCard`: merged metadata header + our body + the original card's text."""
    from huggingface_hub import ModelCard

    metadata, original_text = _parse_original(facts.original)
    data = card_data(metadata, facts)
    body = _body(facts, original_text)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def write_model_card(path: Path, facts: CardFacts) -> None:
    """Write the card to `path` (a new file in the temporary output folder), fsynced like every output."""
    text = str(model_card(facts))
    try:
        with open(path, "x", encoding="utf-8") as f:
            f.write(text if text.endswith("\n") else text + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OutputError(f"cannot write {path}: {os.strerror(e.errno or 0)}") from e


def card_data(original: dict[str, Any], facts: CardFacts) -> Any:
    """The original card's metadata, minus what described the original repo, plus our lineage fields."""
    from huggingface_hub import ModelCardData

    kept = {k: v for k, v in original.items() if k not in _DROPPED_KEYS}
    tags = kept.pop("tags", None) or []
    tags = [tags] if isinstance(tags, str) else [str(t) for t in tags]
    lineage: dict[str, Any] = {}
    relayered = facts.plan.kind is PlanKind.LAYERS
    if facts.base_model:
        # "finetune" is the Hub's closest relation: same weights plus new (to be trained) blocks; a layer
        # map that repeats, drops or reorders layers is what the Hub calls a merge (mergekit passthrough).
        relation = "merge" if not facts.plan.is_identity_map else "finetune"
        lineage = {"base_model": facts.base_model, "base_model_relation": relation}
    return ModelCardData(
        **kept,
        **lineage,
        library_name="transformers",
        tags=list(dict.fromkeys([*tags, *(RELAYER_TAGS if relayered else TAGS)])),
        ignore_metadata_errors=True,
    )


def read_card_source(readme: Path) -> tuple[str | None, list[str]]:
    """The input's README.md text for the card, and a warning when it (or its metadata) is left out."""
    try:
        fd = os.open(readme, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            data = os.read(fd, MAX_CARD_SIZE + 1) if os.fstat(fd).st_size <= MAX_CARD_SIZE else None
        finally:
            os.close(fd)
    except OSError as e:
        raise InputError(f"cannot read {readme}: {os.strerror(e.errno or 0)}") from e
    if data is None or len(data) > MAX_CARD_SIZE:
        return None, [f"{readme} is over {MAX_CARD_SIZE} bytes; the model card leaves it out"]
    text = data.decode("utf-8", errors="replace")
    problem = metadata_problem(text)
    if problem:
        return text, [f"{readme}: {problem}; the model card keeps its text without its metadata"]
    return text, []


def metadata_problem(text: str) -> str | None:
    """Why the card's YAML metadata must not be loaded (too large, or expanding too far); None if fine."""
    import yaml  # a dependency (pyproject.toml); no stubs installed, mypy's overrides ignore them
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    match = REGEX_YAML_BLOCK.search(text)
    if match is None:
        return None
    block = match.group(2)
    if len(block.encode("utf-8", "replace")) > MAX_METADATA_SIZE:
        return f"its metadata is over {MAX_METADATA_SIZE} bytes"
    try:
        # compose() builds the node graph without expanding aliases: its size is the document's.
        root = yaml.compose(block, Loader=yaml.SafeLoader)
        nodes = 0 if root is None else _expanded_nodes(root, {}, set())
    except (yaml.YAMLError, RecursionError):
        return None  # not YAML: the card keeps it as text (`_parse_original`)
    if nodes > MAX_METADATA_NODES:
        return f"its metadata expands to more than {MAX_METADATA_NODES} YAML nodes (aliases)"
    return None


def _expanded_nodes(node: Any, sizes: dict[int, int], open_: set[int]) -> int:
    """Nodes of the tree that loading would build, capped just past the budget; a cycle counts as over."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:  # a recursive alias: an infinite structure
        return MAX_METADATA_NODES + 1
    open_.add(key)
    total = 1
    value = node.value if isinstance(node.value, list) else []
    for child in value:
        for part in child if isinstance(child, tuple) else (child,):  # mapping pairs or sequence items
            total = min(total + _expanded_nodes(part, sizes, open_), MAX_METADATA_NODES + 1)
    open_.discard(key)
    sizes[key] = total
    return total


def _parse_original(text: str | None) -> tuple[dict[str, Any], str]:
    """(metadata dict, text below the metadata header); a card whose header is not valid YAML is text,
    one whose metadata is too large or expands too far is its text without the header."""
    if not text or not text.strip():
        return {}, ""
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    match = REGEX_YAML_BLOCK.search(text)
    if not match:  # no header (ModelCard would log a warning: we never print)
        return {}, text
    if metadata_problem(text):
        return {}, text[match.end() :]
    try:
        card = ModelCard(text, ignore_metadata_errors=True)
    except Exception:  # yaml.YAMLError or a non-mapping header: keep every byte as text rather than guess
        return {}, text
    data: Any = card.data  # ModelCardData.to_dict is untyped
    return dict(data.to_dict()), str(card.text)


def _body(facts: CardFacts, original_text: str) -> str:
    if facts.plan.kind is PlanKind.LAYERS:
        parts = [_relayer_intro(facts), _how(facts), _map_layout(facts.plan), _relayer_next_steps(facts)]
    else:
        parts = [_intro(facts), _how(facts), _layout(facts.plan), _next_steps(facts)]
    if original_text.strip():
        parts.append(
            f"## Original model card\n\nThe card of `{facts.source}` as it was when this model was made "
            "(its metadata is merged into this card's header).\n\n" + original_text.strip() + "\n"
        )
    return "\n".join(parts)


def _intro(facts: CardFacts) -> str:
    plan = facts.plan
    base = facts.base_model
    src = f"[{base}](https://huggingface.co/{base})" if base else f"`{facts.source}`"
    return (
        f"# {facts.name}\n\n"
        f"{src} ({facts.architecture}) expanded from {plan.num_layers_in} to {plan.num_layers_out} layers "
        f"by [LLaMA Pro]({PAPER}) block expansion with llamapro {__version__}. Each new layer is a copy "
        "of an original layer whose residual-writing output projections (weights and biases) are zero, so "
        "until it is trained this model computes exactly the logits of the original. Train the new layers "
        "only, keeping the original ones frozen.\n"
    )


def _relayer_intro(facts: CardFacts) -> str:
    plan = facts.plan
    base = facts.base_model
    src = f"[{base}](https://huggingface.co/{base})" if base else f"`{facts.source}`"
    what = (
        "Every original layer is kept once and in order, and the other layers are copies whose "
        "residual-writing output projections are zero, so until it is trained this model computes exactly "
        "the logits of the original. Train the zeroed copies only."
        if plan.is_identity_map
        else "Layers are repeated, dropped or reordered, so this is a new model: it does not compute what "
        "the original does (`llamapro compare` measures how far apart they are)."
    )
    return (
        f"# {facts.name}\n\n"
        f"{src} ({facts.architecture}) relayered from {plan.num_layers_in} to {plan.num_layers_out} layers "
        f"with llamapro {__version__}: each output layer is a byte copy of its source layer, with the "
        f"config's per-layer fields following it. {what}\n"
    )


def _how(facts: CardFacts) -> str:
    verb = "relayer" if facts.plan.kind is PlanKind.LAYERS else "expand"
    command = facts.command or (
        f"llamapro {verb} {plan_options(facts.plan)} --in {facts.source} --out {facts.model_ref}"
    )
    revision = f" at revision `{facts.revision}`" if facts.revision else ""
    return (
        "## How it was made\n\n"
        f"Input: `{facts.source}`{revision}. Command:\n\n```bash\n{command}\n```\n\n"
        "| | layers | parameters |\n|---|---:|---:|\n"
        f"| original | {facts.plan.num_layers_in} | {human_count(facts.parameters_in)} "
        f"({facts.parameters_in:,}) |\n"
        f"| {'relayered' if verb == 'relayer' else 'expanded'} | {facts.plan.num_layers_out} | "
        f"{human_count(facts.parameters_out)} "
        f"({facts.parameters_out:,}) |\n\n"
        "`llamapro.json` in this repository records the plan, the source and the zeroed tensors.\n"
    )


def _layout(plan: ExpansionPlan) -> str:
    rows = "".join(f"| {layer.index} | {layer.source} |\n" for layer in plan.layers if layer.identity)
    line = " ".join(f"[{x.source}]" if x.identity else str(x.source) for x in plan.layers)
    return (
        f"## New layers\n\nPlan: `{plan_options(plan)}`. Each new layer starts as an identity copy of its "
        "source layer.\n\n| new layer | copy of original layer |\n|---:|---:|\n"
        f"{rows}\nLayout (original layer indices in order; copies in brackets):\n\n```text\n{line}\n```\n"
    )


def _map_layout(plan: ExpansionPlan) -> str:
    line = " ".join(f"[{x.source}]" if x.identity else str(x.source) for x in plan.layers)
    return (
        f"## Layer map\n\nMap: `{plan_options(plan)}` (source layers in output order; a `z` marks a "
        "zeroed copy).\n\nLayout (the source layer of each output layer; zeroed copies in brackets):\n\n"
        f"```text\n{line}\n```\n"
    )


def _relayer_next_steps(facts: CardFacts) -> str:
    ref = facts.model_ref
    if facts.plan.is_identity_map and facts.plan.new_indices:
        return _next_steps(facts)
    train = f"# which parameters to train (the zeroed copies)\nllamapro freeze-map {ref} --format hf\n"
    return (
        "## Check and train\n\n```bash\n"
        "# how far apart this model and the original are on the same tokens\n"
        f"llamapro compare {facts.source} {ref}\n"
        f"{train if facts.plan.new_indices else ''}```\n"
    )


def _next_steps(facts: CardFacts) -> str:
    ref = facts.model_ref
    audit = f"llamapro verify-frozen --map {ref} --trained ./trained\n" if facts.digests else ""
    return (
        "## Check and train\n\n```bash\n"
        "# the expanded model computes exactly what the original does (logits bit for bit)\n"
        f"llamapro verify-identity --in {facts.source} --out {ref}\n"
        "# which parameters to train (the new layers, fully), for your trainer: hf, axolotl, swift, ...\n"
        f"llamapro freeze-map {ref} --format hf\n"
        f"{audit}```\n"
    )


def human_count(n: int) -> str:
    """A parameter count as people write it: 6.74B, 725.50K, 12. The one format of the card and the CLI."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
