"""`llamapro demo-checkpoint` (library twin: `demo.write_demo_checkpoint`).

Invariant: never writes into an existing path.
Must not: import torch (the demo is written with numpy and safetensors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llamapro_cli.cli import console
from llamapro_cli.cli.options import CommandSpec, integer

MAX_LAYERS = 1024
EXAMPLES = ("llamapro demo-checkpoint ./demo-llama && llamapro inspect ./demo-llama",)


def demo_checkpoint(
    out: Annotated[Path, typer.Argument(metavar="DIR", help="Folder to create (must not exist).")],
    layers: Annotated[int, integer("--layers", help="Number of decoder layers (1 to 1024).")] = 8,
    seed: Annotated[int, integer("--seed", help="Random seed for the weights.")] = 0,
) -> None:
    """Write a small Llama checkpoint with seeded random bf16 weights (for demos and trying things out)."""
    from llamapro_cli.demo import write_demo_checkpoint
    from llamapro_cli.errors import OutputError, UsageError

    if out.exists():
        raise OutputError(f"{out} already exists", hint="choose a new folder")
    if not 1 <= layers <= MAX_LAYERS:  # a demo: 1024 layers are already 1.5 GB
        raise UsageError(f"--layers must be 1 to {MAX_LAYERS}, got {layers}")
    write_demo_checkpoint(out, seed=seed, layers=layers)
    console.note(f"wrote a {layers}-layer demo Llama checkpoint to {out}")


COMMAND = CommandSpec("demo-checkpoint", demo_checkpoint, EXAMPLES)
