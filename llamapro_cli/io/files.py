"""Bounded reads of small files, and the names of the files in a checkpoint folder.

Owns `read_json()` / `read_text_bounded()`, the one way the package reads config.json, the shard index
and `llamapro.json`: a regular file only (a FIFO or a device would block or never end), at most
`MAX_JSON_SIZE` bytes (a hostile or broken file is never read whole), errors as one-line `InputError`s
naming the file. Owns the checkpoint folder's file names, so no module spells them twice.

Invariant: nothing here reads more than `limit + 1` bytes of a file. Must not: write anything, import
anything of the package above `errors`.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from llamapro_cli.errors import InputError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PROVENANCE_NAME = "llamapro.json"
# config.json, the shard index, llamapro.json: real ones are kilobytes (a large MoE index a few MB).
MAX_JSON_SIZE = 100 * 1024 * 1024


def os_message(error: OSError) -> str:
    """The OS's words for an error ("No space left on device"), or the exception's text without errno."""
    return os.strerror(error.errno) if error.errno else str(error)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def read_bytes_bounded(path: Path, what: str, *, limit: int = MAX_JSON_SIZE) -> bytes:
    """The bytes of the regular file `path` (described as `what` in errors); InputError beyond `limit`."""
    try:
        # O_NONBLOCK: a FIFO swapped in after the check below must not block the open.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise InputError(f"{path}: {what} is missing") from e
    except OSError as e:  # e.g. a folder we may not search: one line, never a bare PermissionError
        raise InputError(f"{path}: cannot read {what}: {os_message(e)}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block or never end
            raise InputError(f"{path}: {what} is not a regular file")
        # Refused by its size before a byte is read; the bounded read still guards a file that grows.
        data = _read_up_to(fd, limit + 1) if st.st_size <= limit else b""
    except OSError as e:
        raise InputError(f"{path}: cannot read {what}: {os_message(e)}") from e
    finally:
        os.close(fd)
    if st.st_size > limit or len(data) > limit:
        raise InputError(f"{path}: {what} is larger than {limit} bytes")
    return data


def _read_up_to(fd: int, n: int) -> bytes:
    parts: list[bytes] = []
    while n > 0 and (chunk := os.read(fd, min(n, 1 << 24))):
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def read_text_bounded(path: Path, what: str, *, limit: int = MAX_JSON_SIZE) -> str:
    """The text of `path` as UTF-8 (undecodable bytes replaced), read as `read_bytes_bounded` reads."""
    return read_bytes_bounded(path, what, limit=limit).decode("utf-8", errors="replace")


def read_json(path: Path, what: str, *, limit: int = MAX_JSON_SIZE) -> tuple[Any, bytes]:
    """(parsed JSON, the raw bytes) of `path`; InputError when missing, too large or not JSON."""
    data = read_bytes_bounded(path, what, limit=limit)
    try:
        return json.loads(data), data
    except RecursionError as e:
        raise InputError(f"{path}: {what} is nested too deeply") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, ints beyond Python's digit limit
        raise InputError(f"{path}: {what} is not valid JSON ({_first_line(e)})") from e
