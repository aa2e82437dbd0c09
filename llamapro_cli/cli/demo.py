"""`llamapro demo-checkpoint` (library twin: `demo.write_demo_checkpoint`).

Invariant: never writes into an existing path.
Must not: import torch (the demo is written with numpy and safetensors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llamapro_cli.cli import console
from llamapro_cli.cli.options import CommandSpec

EXAMPLES = ("llamapro demo-checkpoint ./demo-llama && llamapro inspect ./demo-llama",)


def demo_checkpoint(
    out: Annotated[Path, typer.Argument(metavar="DIR", help="Folder to create (must not exist).")],
    layers: Annotated[int, typer.Option(metavar="N", help="Number of decoder layers.")] = 8,
    seed: Annotated[int, typer.Option(metavar="N", help="Random seed for the weights.")] = 0,
) -> None:
    """Write a small Llama checkpoint with seeded random bf16 weights (for demos and trying things out)."""
    from llamapro_cli.demo import write_demo_checkpoint
    from llamapro_cli.errors import OutputError, UsageError

    if out.exists():
        raise OutputError(f"{out} already exists", hint="choose a new folder")
    if layers < 1:
        raise UsageError("--layers must be at least 1")
    write_demo_checkpoint(out, seed=seed, layers=layers)
    console.note(f"wrote a {layers}-layer demo Llama checkpoint to {out}")


COMMAND = CommandSpec("demo-checkpoint", demo_checkpoint, EXAMPLES)
