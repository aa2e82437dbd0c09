"""GGUF for llama.cpp: conversion with the engine's own converter, and the per-layer sliding pattern.

llama.cpp decides which layers use a sliding window from `{arch}.attention.sliding_window_pattern`:
an array (one flag per layer) is taken as is; a number or no key means a period, expanded by the layer
index (`llama_hparams::set_swa_pattern`: layer il slides when il % P < P - 1, or il % P != 0 for the
architectures that put the full layer first). The converter writes the array for some families and
nothing for others (Gemma 2, Gemma 3), so an expansion that breaks the index pattern runs as a different
model. `wanted_pattern` reads the pattern from the checkpoint's config (what transformers runs),
`effective_pattern` computes what llama.cpp will run from the GGUF's metadata, and `write_gguf_pattern`
(`llamapro gguf-pattern`) writes the array with the gguf-py of the engine's source (`adapters/gguf_tools.py`).

Invariant: GGUF_OUT is written beside itself under a temporary name and renamed only when complete;
GGUF_IN is only read. Conversion uses the `convert_hf_to_gguf.py` of the source the engine was built from.
Must not: import gguf, torch or llama_cpp into llamapro's interpreter (all of it runs in the engine's).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamapro_cli.architectures.layers import layer_kinds
from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.errors import InputError, OutputError
from llamapro_cli.verify.engines.runner import adapter_env, last_line, resolve_python, run_logged
from llamapro_cli.verify.engines.spec import ServingEngine

TOOLS = Path(__file__).parent / "adapters" / "gguf_tools.py"
CONVERTER = Path("vendor") / "llama.cpp" / "convert_hf_to_gguf.py"
SOURCE_ENV = "LLAMAPRO_LLAMA_CPP_SOURCE"  # a llama.cpp source tree whose converter to use instead
OUTTYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

# Architectures whose llama.cpp loader calls `load_swa_pattern(ml, period, dense_first)` (src/models/*.cpp
# of llama.cpp as vendored by llama-cpp-python 0.3.36): the only ones that honour the per-layer array.
SWA_RULES: dict[str, tuple[int, bool]] = {
    "afmoe": (4, False),
    "cohere2": (4, False),
    "cohere2moe": (4, True),
    "exaone-moe": (4, False),
    "exaone4": (4, False),
    "gemma-embedding": (6, False),
    "gemma2": (2, False),
    "gemma3": (6, False),
    "gemma3n": (5, False),
    "gpt-oss": (2, False),
    "laguna": (4, True),
    "llama4": (4, False),
    "mellum": (4, False),
    "modern-bert": (3, True),
    "muse-glimmer": (4, False),
    "olmo2": (4, False),
    "plamo3": (8, False),
    "smallthinker": (4, True),
}


@dataclass(frozen=True)
class GgufInfo:
    path: Path
    architecture: str
    block_count: int | None
    pattern: list[bool] | int | None  # the sliding-pattern key as the GGUF holds it (None: absent)
    vocab: int | None


@dataclass(frozen=True)
class PatternResult:
    """What `gguf-pattern` did."""

    gguf_out: str
    architecture: str
    key: str
    written: bool  # False: nothing to fix, GGUF_OUT is a copy of GGUF_IN
    sliding_layers: tuple[int, ...]
    notes: tuple[str, ...]


def wanted_pattern(ckpt: Checkpoint) -> list[bool] | None:
    """Per layer, whether it slides, as the config says (transformers' reading); None when no layer does."""
    kinds = layer_kinds(ckpt.family, ckpt.config)
    if kinds is None:
        return None
    flags = ["sliding_attention" in kind.split() for kind in kinds]
    return flags if any(flags) else None


def index_pattern(arch: str, layers: int, period: int | None = None) -> list[bool] | None:
    """llama.cpp's `set_swa_pattern` for `arch` (None: the architecture has no per-layer sliding)."""
    if arch not in SWA_RULES:
        return None
    default, dense_first = SWA_RULES[arch]
    p = default if period is None else period
    if dense_first:
        return [p == 0 or il % p != 0 for il in range(layers)]
    return [p == 0 or il % p < p - 1 for il in range(layers)]


def effective_pattern(info: GgufInfo) -> list[bool] | None:
    """The sliding layers llama.cpp will use for this GGUF (None: no per-layer rule for its arch)."""
    if info.architecture not in SWA_RULES or info.block_count is None:
        return None
    if isinstance(info.pattern, list):
        return info.pattern
    return index_pattern(info.architecture, info.block_count, info.pattern)


def pattern_mismatch(ckpt: Checkpoint, info: GgufInfo) -> list[int] | None:
    """Layers whose sliding flag in llama.cpp differs from the config's ([] none; None: not expressible)."""
    wanted = wanted_pattern(ckpt)
    if wanted is None:
        return []
    got = effective_pattern(info)
    if got is None:
        return None
    return [i for i, (w, g) in enumerate(zip(wanted, got, strict=False)) if w != g] + (
        [] if len(got) == len(wanted) else list(range(min(len(got), len(wanted)), len(wanted)))
    )


def layers_text(indices: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(map(str, indices[:limit]))
    return shown + (f", … ({len(indices)} in all)" if len(indices) > limit else "")


# --- running the tools in the engine's interpreter -----------------------------------------------------


def find_converter(python: Path) -> Path:
    """`convert_hf_to_gguf.py` of the source the engine was built from (kept by `engines install`)."""
    override = os.environ.get(SOURCE_ENV)
    roots = [Path(override)] if override else []
    env_root = python.parent.parent.parent  # <engine dir>/venv/bin/python
    roots += sorted((env_root / "src").glob("*")) if (env_root / "src").is_dir() else []
    for root in roots:
        for candidate in (root / CONVERTER, root / CONVERTER.name):
            if candidate.is_file():
                return candidate
    raise InputError(
        f"no llama.cpp converter ({CONVERTER.name}) beside {python}",
        hint=f"`llamapro engines install llama.cpp` keeps it; or set {SOURCE_ENV} to a llama.cpp source tree",
    )


def convert(ckpt: Checkpoint, out: Path, dtype: str, python: Path, work: Path, warnings: list[str]) -> Path:
    """`ckpt` as a GGUF of `dtype` at `out`, converted by the engine's converter."""
    refuse_checkpoint_code(ckpt)
    model_dir = _with_tokenizer(ckpt, work / f"{out.stem}-view", python, warnings)
    command = [str(python), str(find_converter(python)), str(model_dir), "--outfile", str(out)]
    command += ["--outtype", OUTTYPE[dtype]]
    log = work / f"convert-{out.stem}.log"
    if run_logged(command, log, adapter_env(os.cpu_count() or 1)) != 0 or not out.is_file():
        raise InputError(
            f"llama.cpp's converter cannot convert {ckpt.root}: {last_line(log)}",
            hint="the converter of this llama.cpp version does not support this checkpoint",
        )
    return out


def refuse_checkpoint_code(ckpt: Checkpoint) -> None:
    """llama.cpp's converter loads tokenizers with `trust_remote_code=True`: a checkpoint whose config or
    tokenizer config names its own code (`auto_map`) would run that code. llamapro never does that."""
    for name in ("config.json", "tokenizer_config.json"):
        path = ckpt.root / name
        try:
            doc = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            doc = {}
        if isinstance(doc, dict) and "auto_map" in doc:
            raise InputError(
                f"{path}: auto_map names the checkpoint's own Python code, which llama.cpp's converter would "
                "run (it loads tokenizers with trust_remote_code=True); llamapro never runs code from a "
                "checkpoint",
                hint="review that code and convert the checkpoint yourself, or use --engine vllm or mlx",
            )


def _with_tokenizer(ckpt: Checkpoint, view: Path, python: Path, warnings: list[str]) -> Path:
    """The checkpoint folder, or a view of it with a placeholder tokenizer when it has none: the
    converter needs a vocabulary, the check only token ids (its files are linked, never copied)."""
    if any((ckpt.root / name).is_file() for name in TOKENIZER_FILES):
        return ckpt.root
    vocab = ckpt.family.sub_config(ckpt.config).get("vocab_size")
    if not isinstance(vocab, int) or vocab < 4:
        raise InputError(f"{ckpt.root}: no tokenizer and no vocab_size, so it cannot be converted to GGUF")
    view.mkdir()
    for item in ckpt.root.iterdir():
        if item.is_file():
            (view / item.name).symlink_to(item.resolve())
    _tools(python, ["placeholder-tokenizer", str(view), str(vocab)], view.parent, "tokenizer")
    warnings.append(
        f"{ckpt.root} has no tokenizer: its GGUF got a placeholder vocabulary of {vocab} tokens "
        "(the check feeds token ids, so the logits are unaffected)"
    )
    return view


def inspect_ggufs(python: Path, paths: Sequence[Path], work: Path) -> list[GgufInfo]:
    out = work / f"inspect-{secrets.token_hex(4)}.json"
    _tools(python, ["inspect", str(out), *map(str, paths)], work, "inspect")
    try:
        raw: list[dict[str, Any]] = json.loads(out.read_text())
        return [
            GgufInfo(Path(r["path"]), str(r["architecture"]), r["block_count"], r["pattern"], r["vocab"])
            for r in raw
        ]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"cannot read the GGUF metadata llama.cpp's gguf-py reported: {e}") from None


def patch(python: Path, src: Path, dst: Path, values: Sequence[bool], work: Path) -> None:
    """Write `dst`: `src` with the per-layer sliding pattern `values` (gguf-py's writer)."""
    spec = work / f"pattern-{secrets.token_hex(4)}.json"
    spec.write_text(json.dumps([bool(v) for v in values]))
    _tools(python, ["pattern", str(src), str(dst), str(spec)], work, "pattern")


def _tools(python: Path, args: list[str], work: Path, what: str) -> None:
    log = work / f"gguf-{what}.log"
    if run_logged([str(python), str(TOOLS), *args], log, adapter_env(1)) != 0:
        raise InputError(f"llama.cpp's gguf-py failed ({what}): {last_line(log)}")


# --- llamapro gguf-pattern ----------------------------------------------------------------------------


def write_gguf_pattern(
    expanded: Checkpoint, gguf_in: str | Path, gguf_out: str | Path, *, python: str | Path | None = None
) -> PatternResult:
    """Copy GGUF_IN to GGUF_OUT with llama.cpp's per-layer sliding pattern taken from `expanded`."""
    src, dst = Path(gguf_in), Path(gguf_out)
    if not src.is_file():
        raise InputError(f"{src}: no such GGUF file")
    if dst.exists() or dst.is_symlink():
        raise OutputError(f"{dst} already exists", hint="choose a new file name")
    if not dst.parent.is_dir():
        raise OutputError(f"{dst.parent}: no such folder")
    engine_python = resolve_python(ServingEngine.LLAMA_CPP, python)
    with tempfile.TemporaryDirectory(prefix="llamapro-gguf-") as tmp:
        work = Path(tmp)
        info = inspect_ggufs(engine_python, [src], work)[0]
        result = pattern_plan(expanded, info, dst)
        partial = dst.with_name(f"{dst.name}.partial-{secrets.token_hex(4)}")
        try:
            if result.written:
                wanted = wanted_pattern(expanded) or []
                patch(engine_python, src, partial, wanted, work)
            else:
                shutil.copyfile(src, partial)
            partial.replace(dst)
        finally:
            partial.unlink(missing_ok=True)
    return result


def pattern_plan(expanded: Checkpoint, info: GgufInfo, dst: Path) -> PatternResult:
    key = f"{info.architecture}.attention.sliding_window_pattern"
    wanted = wanted_pattern(expanded)
    if info.block_count is not None and info.block_count != expanded.num_layers:
        raise InputError(
            f"{info.path} has {info.block_count} layers but {expanded.root} has {expanded.num_layers}",
            hint="is GGUF_IN the conversion of EXPANDED?",
        )
    sliding = tuple(i for i, s in enumerate(wanted or []) if s)
    if wanted is None:
        note = f"{expanded.root} has no sliding-window layers: nothing to fix, {dst} is a copy"
        return PatternResult(str(dst), info.architecture, key, False, (), (note,))
    mismatch = pattern_mismatch(expanded, info)
    if mismatch is None:
        raise InputError(
            f"llama.cpp's {info.architecture} architecture reads no per-layer sliding pattern, so no GGUF "
            f"metadata can give it {expanded.root}'s layer_types",
            hint="serve it with an engine that reads layer_types (transformers, vLLM)",
        )
    if not mismatch:
        note = f"llama.cpp already slides on layers {layers_text(sliding)}: nothing to fix, {dst} is a copy"
        return PatternResult(str(dst), info.architecture, key, False, sliding, (note,))
    note = (
        f"wrote {key} ({len(wanted)} layers, sliding: {layers_text(sliding)}); llama.cpp would have "
        f"got layers {layers_text(mismatch)} wrong"
    )
    return PatternResult(str(dst), info.architecture, key, True, sliding, (note,))
