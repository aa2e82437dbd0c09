"""The one source of the version: the installed distribution's metadata (pyproject.toml's `version`).

Must not: import anything of the package (every layer may import this module)."""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("llamapro-cli")
except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare source tree
    __version__ = "0.0.0+unknown"
