"""Bounded reads of the small JSON files the training wing reads: manifests, trained-folder indexes.

Owns `read_json()`: a regular file only (a FIFO or a device would block or never end), at most
`MAX_JSON_SIZE` bytes (a hostile 4 GiB index is never read whole), errors as one-line `InputError`s naming
the file. Same contract and signature as `io.files.read_json` of the io wing, which replaces it once
both are on main.

Invariant: nothing here reads more than `limit + 1` bytes of a file. Must not: write anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llamapro_cli.checkpoint import MAX_JSON_SIZE
from llamapro_cli.errors import InputError


def read_json(path: Path, what: str, *, limit: int = MAX_JSON_SIZE) -> tuple[Any, bytes]:
    """(parsed JSON, the raw bytes) of `path`; InputError when missing, too large or not JSON."""
    if not path.exists():
        raise InputError(f"{path}: {what} is missing")
    if not path.is_file():
        raise InputError(f"{path}: {what} is not a regular file")
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise InputError(f"{path}: cannot read {what}: {os.strerror(e.errno or 0)}") from e
    if len(data) > limit:
        raise InputError(f"{path}: {what} is larger than {limit} bytes")
    try:
        return json.loads(data), data
    except RecursionError as e:
        raise InputError(f"{path}: {what} is nested too deeply") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, ints beyond Python's digit limit
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"{path}: {what} is not valid JSON ({first})") from e
