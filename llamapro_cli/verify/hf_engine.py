"""The transformers engine of `verify-identity`: the real modelling code, one model in memory at a time.

`compare_hf` loads the base, runs the three passes (`numerics`: full forward, prefill + cached one-token
steps, greedy tokens), keeps its outputs on the CPU, frees it, then does the same with the expanded model
and compares. Loading must be clean: transformers only *warns* about missing or unexpected keys and fills
the gaps with random weights, so every such key is a problem we report. `config_reader` reads a config as
transformers does (every default filled in), for the structural check's one-sided keys.

Nothing from the checkpoint runs: every transformers call says `trust_remote_code=False` and sees an
empty stdin (`sealed`), and `refuse_remote_code` refuses, before anything loads, a tokenizer or model only
the checkpoint's own code (`auto_map`) could build.

Invariant: transformers' logging and progress bars are silenced while it works, then restored.
Must not: import torch or transformers at module level; print; let transformers read stdin.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.errors import InputError
from llamapro_cli.io.files import read_json
from llamapro_cli.verify.numerics import Inputs, NumericalResult, Outputs, compare_outputs
from llamapro_cli.verify.progress import Phase, PhaseProgress

if TYPE_CHECKING:
    import torch


def compare_hf(
    base_root: Path,
    expanded_root: Path,
    inputs: Inputs,
    device: str,
    dtype: torch.dtype,
    atol: float,
    progress: PhaseProgress | None = None,
) -> NumericalResult:
    """The transformers engine: the base's outputs, then the expanded model's, compared."""
    try:
        reference, problems = hf_outputs(base_root, inputs, device, dtype, progress, BASE_PHASES)
    except LoadFailed as e:
        raise InputError(
            f"transformers cannot load the base {base_root}: {e}",
            hint="the numerical check needs a transformers version that supports it; try --engine native",
        ) from None
    if problems:
        raise InputError(
            f"transformers does not load the base {base_root} cleanly ({problems[0]})",
            hint="the base itself is incomplete; verify against a complete checkpoint",
        )
    try:
        got, problems = hf_outputs(expanded_root, inputs, device, dtype, progress, EXPANDED_PHASES)
    except LoadFailed as e:
        problem = f"transformers cannot load the expanded checkpoint: {e}"
        return NumericalResult(None, None, False, None, None, problem, problem=problem)
    numbers = compare_outputs(reference, got, atol)
    if problems:
        problem = f"loading the expanded checkpoint: {problems[0]}" + (
            f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        )
        return replace(numbers, problem=problem, divergence=problem)
    return numbers


def refuse_remote_code(ckpt: Checkpoint, *, model: bool, tokenizer: bool) -> None:
    """An `InputError` (exit 3) when transformers could load this checkpoint's model (or its tokenizer)
    only by running the checkpoint's own Python code, which `auto_map` names.

    Every transformers call here says `trust_remote_code=False`, so such code never runs; this refusal
    says why, before anything is loaded. A config.json `auto_map` beside a model type transformers
    implements itself (hub InternLM3 configs have one) needs no code: transformers' own class is used.
    A tokenizer with `auto_map` does (the checkpoint's tokenizer class): `--prompt` is refused."""
    config = ckpt.config
    if model and "auto_map" in config and not _implemented(config.get("model_type")):
        raise InputError(
            f"{ckpt.root / 'config.json'}: transformers has no {config.get('model_type')!r} model of its own "
            f"and auto_map asks it to run the checkpoint's code ({_short(config['auto_map'])}); llamapro "
            "never runs code from a checkpoint",
            hint="use --engine native, which runs no code from the checkpoint (llama, mistral, qwen2, qwen3)",
        )
    tokenizer_config = ckpt.root / "tokenizer_config.json"
    doc = _json_object(tokenizer_config) if tokenizer and tokenizer_config.exists() else {}
    auto_map = config.get("auto_map")
    from_config: dict[str, Any] = auto_map if isinstance(auto_map, dict) else {}
    if "auto_map" in doc or (tokenizer and "AutoTokenizer" in from_config):
        where = tokenizer_config if "auto_map" in doc else ckpt.root / "config.json"
        raise InputError(
            f"{where}: auto_map asks transformers to run the checkpoint's own Python code for its tokenizer "
            f"({_short(doc.get('auto_map', from_config.get('AutoTokenizer')))}); llamapro never runs code "
            "from a checkpoint",
            hint="use --tokens N (seeded random token ids) instead of --prompt",
        )


def _implemented(model_type: Any) -> bool:
    from transformers import CONFIG_MAPPING

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING


def _json_object(path: Path) -> dict[str, Any]:
    """A small JSON object file, read bounded (`io.files`); anything else is bad input."""
    doc, _ = read_json(path, "the tokenizer config")
    if not isinstance(doc, dict):
        raise InputError(f"{path}: not a JSON object")
    return doc


def _short(value: Any) -> str:
    text = ascii(value)  # escaped: data, never markup or control characters
    return text if len(text) <= 80 else text[:77] + "..."


BASE_PHASES = (Phase.LOAD_BASE, Phase.RUN_BASE)
EXPANDED_PHASES = (Phase.LOAD_EXPANDED, Phase.RUN_EXPANDED)


class LoadFailed(Exception):
    """transformers could not build the model (its first line says why)."""


def hf_outputs(
    root: Path,
    inputs: Inputs,
    device: str,
    dtype: torch.dtype,
    progress: PhaseProgress | None = None,
    phases: tuple[Phase, Phase] = BASE_PHASES,
) -> tuple[Outputs, list[str]]:
    """Load one model, run the three passes, free the model; loading problems are returned, not raised."""
    import torch

    report = progress or (lambda phase, done, total: None)
    load, run = phases
    report(load, 0, 1)
    model, problems = load_model(root, device, dtype)
    report(load, 1, 1)
    calls = [0, 1 + (1 + inputs.ids.shape[1] - inputs.prefill) + inputs.decode_steps]  # forward calls

    def tick() -> None:
        calls[0] += 1
        report(run, calls[0], calls[1])

    try:
        ids = inputs.ids.to(device)
        with torch.inference_mode(), sealed():  # e.g. "kernel not installed" notes
            full = model(input_ids=ids, use_cache=False).logits
            tick()
            cached = _cached(model, ids, inputs.prefill, tick)
            greedy = _greedy(model, ids, inputs.decode_steps, tick)
        return Outputs(full.cpu(), cached.cpu(), greedy.cpu()), problems
    finally:
        del model
        release(device)


def release(device: str) -> None:
    """Give a dropped model's memory back (call after the last reference to it is gone)."""
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def load_model(root: Path, device: str, dtype: torch.dtype) -> tuple[Any, list[str]]:
    """One checkpoint as transformers loads it (eager attention, no remote code), on `device` in `dtype`,
    and its loading problems (missing, unexpected or mismatched keys); `LoadFailed` when it cannot."""
    import transformers

    # transformers >= 4.56 calls it `dtype`; older versions only know `torch_dtype`.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    kwargs: dict[str, Any] = {
        "output_loading_info": True,
        "attn_implementation": "eager",
        "trust_remote_code": False,  # never the checkpoint's own code (refused before, see remote_code)
        dtype_key: dtype,
    }
    try:
        with sealed():  # we report loading problems ourselves
            loaded: Any = _model_class(transformers, root).from_pretrained(root, **kwargs)
    except Exception as e:  # transformers raises many types (config validation, shapes, OS errors)
        raise LoadFailed(_first_line(e)) from e
    model, info = loaded
    labels = {
        "missing_keys": "missing key",
        "unexpected_keys": "unexpected key",
        "mismatched_keys": "mismatched key",
        "error_msgs": "error",
    }
    problems = [
        f"{label} {item}" for key, label in labels.items() for item in sorted(map(str, info.get(key) or ()))
    ]
    return _text_path(model.to(device).eval()), problems


def _model_class(transformers: Any, root: Path) -> Any:
    """The multimodal class config.json names, else AutoModelForCausalLM: Auto maps gemma3 to its
    ForConditionalGeneration class but llama4 to the text-only one, which cannot load the full weights."""
    try:
        names = json.loads((root / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        names = []
    name = str(names[0]) if names else ""
    if name.endswith("ForConditionalGeneration") and hasattr(transformers, name):
        return getattr(transformers, name)
    return transformers.AutoModelForCausalLM


# transformers 5.24's Llama4ForConditionalGeneration.forward reads `outputs.image_outputs`, which its text
# model's output lacks, so every call raises. Without pixel_values its forward is its language_model on
# the same embeddings, so we run that (the weights were still loaded, and checked, as the whole model).
_BROKEN_FORWARD = ("Llama4ForConditionalGeneration",)


def _text_path(model: Any) -> Any:
    return model.language_model if type(model).__name__ in _BROKEN_FORWARD else model


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


@contextlib.contextmanager
def sealed() -> Iterator[None]:
    """transformers quiet (`quiet_transformers`) and unable to read stdin: whatever it might ask (it asks
    "run the custom code? [y/N]" when trust_remote_code is not given), the answer is end-of-file."""
    saved = sys.stdin
    with open(os.devnull) as nothing, quiet_transformers():
        sys.stdin = nothing
        try:
            yield
        finally:
            sys.stdin = saved


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings and progress bars off, then restored (the library must not print)."""
    from transformers.utils import logging

    hf_logging: Any = logging  # its functions are untyped
    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _cache_kwarg(model: Any) -> str:
    # transformers 5.24 renamed `past_key_values` to `cache` (argument and output); accept both.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cached(model: Any, ids: torch.Tensor, prefill: int, tick: Callable[[], None]) -> torch.Tensor:
    import torch

    name = _cache_kwarg(model)
    out = model(input_ids=ids[:, :prefill], use_cache=True)
    tick()
    pieces = [out.logits]
    for t in range(prefill, ids.shape[1]):
        out = model(input_ids=ids[:, t : t + 1], use_cache=True, **{name: getattr(out, name)})
        tick()
        pieces.append(out.logits)
    return torch.cat(pieces, dim=1)


def _greedy(model: Any, ids: torch.Tensor, steps: int, tick: Callable[[], None]) -> torch.Tensor:
    """`steps` greedy tokens after the whole sequence, through the cache (EOS does not stop it)."""
    import torch

    name = _cache_kwarg(model)
    out = model(input_ids=ids, use_cache=True)
    tick()
    tokens: list[torch.Tensor] = []
    for step in range(steps):
        token = out.logits[:, -1:].argmax(dim=-1)
        tokens.append(token)
        if step + 1 < steps:
            out = model(input_ids=token, use_cache=True, **{name: getattr(out, name)})
            tick()
    return torch.cat(tokens, dim=1) if tokens else ids[:, :0]


def config_reader() -> Callable[[Mapping[str, Any]], Mapping[str, Any] | None] | None:
    """A config as transformers reads it (every default filled in), for keys only one config sets; None
    without transformers (then only the keys both configs set are compared, and the numerics decide)."""
    if importlib.util.find_spec("transformers") is None:
        return None

    def read(config: Mapping[str, Any]) -> Mapping[str, Any] | None:
        from transformers import AutoConfig

        values = dict(config)
        model_type = values.pop("model_type")
        try:
            with sealed():
                return _defined(AutoConfig.for_model(model_type, **values), AutoConfig.for_model(model_type))
        except Exception:  # an unknown model type or a config this transformers rejects: no defaults
            return None

    return read


def _defined(config: Any, default: Any) -> dict[str, Any]:
    """`config.to_dict()` limited to the keys its class defines (`default` is the class's default
    instance): stamps other tools add (`unsloth_version`) are no model setting. Sub-configs recurse."""
    from transformers import PretrainedConfig

    known = default.to_dict()
    out: dict[str, Any] = {}
    for key, value in config.to_dict().items():
        if key not in known:
            continue
        sub, sub_default = getattr(config, key, None), getattr(default, key, None)
        both = isinstance(sub, PretrainedConfig) and isinstance(sub_default, PretrainedConfig)
        out[key] = _defined(sub, sub_default) if both else value
    return out
