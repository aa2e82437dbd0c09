"""The command line: the Typer app (`app`), one module per command group with its renderers and
examples (`inspect`, `expand`, `verify`, `freeze`, `hub`, `demo`), shared options (`options`) and the
two output streams (`console`). `llamapro = "llamapro_cli.cli:main"` is the console script.

Must not: contain surgery logic; be imported by any library module."""

from __future__ import annotations

from llamapro_cli.cli.app import main

__all__ = ["main"]
