"""The closed choices and validated options of `verify-identity`.

Owns the `Engine`, `Device` and `DType` enums (the CLI offers exactly their values) and `Options`, the
options of one check after validation: a combination that cannot run is a `UsageError` (exit 2) here,
before any checkpoint is read.

Must not: read files or import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from llamapro_cli.errors import UsageError


class Engine(StrEnum):
    AUTO = "auto"  # transformers when installed, else native
    TRANSFORMERS = "transformers"
    NATIVE = "native"
    # Serving engines, each run in its own interpreter (verify/engines/): base and expanded inside it.
    VLLM = "vllm"
    LLAMA_CPP = "llama.cpp"
    MLX = "mlx"


SERVING_ENGINES = (Engine.VLLM, Engine.LLAMA_CPP, Engine.MLX)


class Device(StrEnum):
    AUTO = "auto"  # CUDA when present
    CUDA = "cuda"
    CPU = "cpu"


class DType(StrEnum):
    AUTO = "auto"  # the checkpoint's dtype (config `dtype`/`torch_dtype`, else its tensors')
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


@dataclass(frozen=True)
class Options:
    """The validated options of one check."""

    engine: Engine
    device: Device
    dtype: DType
    tokens: int | None
    seed: int
    prompt: str | None
    atol: float
    decode_steps: int
    engine_python: str | None = None  # the interpreter of a serving engine (default: its installed env)

    @classmethod
    def parse(cls, **values: Any) -> Options:
        options = cls(
            engine=choice(Engine, values.pop("engine"), "--engine"),
            device=choice(Device, values.pop("device"), "--device"),
            dtype=choice(DType, values.pop("dtype"), "--dtype"),
            **values,
        )
        options.check()
        return options

    def check(self) -> None:
        if self.tokens is not None and self.prompt is not None:
            raise UsageError("--tokens and --prompt exclude each other", hint="give one of them")
        if self.decode_steps < 1:
            raise UsageError(f"decode_steps must be at least 1, got {self.decode_steps}")
        if self.tokens is not None and self.tokens <= self.decode_steps:
            raise UsageError(
                f"--tokens {self.tokens} leaves nothing to prefill: the last {self.decode_steps} tokens "
                "are decoded one at a time through the cache",
                hint=f"use --tokens {self.decode_steps + 1} or more",
            )
        if self.engine_python is not None and self.engine not in SERVING_ENGINES:
            raise UsageError(
                f"--engine-python applies to --engine vllm, llama.cpp or mlx, not {self.engine.value}"
            )
        if not self.atol >= 0:  # also refuses NaN
            raise UsageError(f"--atol must be zero or positive, got {self.atol}")


def choice(enum: type[Any], value: Any, option: str) -> Any:
    """`enum(value)`, or a usage error listing the choices."""
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(e.value for e in enum)
        raise UsageError(f"{option} {value!r} is not one of {choices}") from None
