"""The command line: the Typer app, one thin function per command, the console and the renderers.
`llamapro = "llamapro_cli.cli:main"` is the console script.

Must not: contain surgery logic; be imported by any library module."""

from __future__ import annotations

from llamapro_cli.cli.app import main

__all__ = ["main"]
