"""The files carried over beside the weights: which ones may be, and how they are copied.

A name allow-list (tokenizer files, chat templates, generation and processor configs, licences) picks
the candidates; each must then be DATA, whatever its name matches (`tokenizer*` also matches
`tokenizer_evil.py`): a regular file inside the checkpoint folder (or that repo's hub-cache blobs), with
no code suffix anywhere in its name (`.py`, `.pyc`, `.so`, `.pth`, `.pkl`, …) and not starting like a
program (`#!`, ELF, Mach-O, PE, Python bytecode, a pickle, a zip archive). Everything else in the folder is
listed as not copied. A carried file is streamed (never read whole) through one descriptor, and the data
rule is applied again to the bytes actually read, so a file swapped in after the check is refused too.

Invariant: nothing that a Python import, a loader or a shell would run is ever written into an output;
no byte from outside the checkpoint folder is. Must not: read a carried file into memory; follow a link
out of the folder; print.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from llamapro_cli.errors import InputError, OutputError
from llamapro_cli.folder import resolved, within_checkpoint
from llamapro_cli.io.files import PROVENANCE_NAME, os_message

# Files carried over into the output (design.md §3). Everything else is listed, not copied.
CARRY_PATTERNS = (
    "tokenizer*",
    "*.tiktoken",
    "vocab.*",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template*",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "LICENSE*",
    "NOTICE*",
    "USE_POLICY*",
)
# Files the output gets from us, never from the input (README.md is the model card, `card.py`).
_OWN_FILES = re.compile(
    r"^(config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|README\.md)$"
)
# Suffixes of code, native libraries, archives and pickles: Python imports, loaders or `torch.load`
# would run them. Checked on every dot-separated part, so `x.so.1` and `x.py.txt` count too.
CODE_SUFFIXES = frozenset(
    {
        *("py", "pyc", "pyo", "pyd", "pyw", "pyz", "pyx", "pxd", "pth", "ipynb"),  # Python
        *("so", "dylib", "dll", "exe", "com", "jar", "class", "whl", "egg"),  # native code, packages
        *("sh", "bash", "zsh", "bat", "cmd", "ps1", "js", "mjs", "cjs", "pl", "rb", "lua"),  # scripts
        *("pkl", "pickle", "pt", "bin", "ckpt", "joblib"),  # pickles: loading one runs code
    }
)
# How programs and containers of code start (file(1)-style magic numbers).
_CODE_MAGIC = (
    (b"#!", "a script"),
    (b"\x7fELF", "an ELF executable"),
    (b"MZ", "a Windows executable"),
    (b"\xfe\xed\xfa\xce", "a Mach-O executable"),
    (b"\xfe\xed\xfa\xcf", "a Mach-O executable"),
    (b"\xce\xfa\xed\xfe", "a Mach-O executable"),
    (b"\xcf\xfa\xed\xfe", "a Mach-O executable"),
    (b"\xca\xfe\xba\xbe", "a Mach-O or Java class file"),
    (b"PK\x03\x04", "a zip archive"),
)
_MAGIC_BYTES = 8
_COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class Companions:
    """The input folder's other files: carried (names), not copied (names, folders with a '/'), and why
    a name-matching file was refused as code."""

    carried: tuple[str, ...]
    not_copied: tuple[str, ...]
    warnings: tuple[str, ...]


def companions(root: Path) -> Companions:
    carried: list[str] = []
    not_copied: list[str] = []
    warnings: list[str] = []
    for entry in sorted(root.iterdir()):
        name = entry.name
        if name.startswith(".") or _OWN_FILES.match(name) or name == PROVENANCE_NAME:
            continue
        if not any(fnmatch.fnmatch(name, p) for p in CARRY_PATTERNS):
            not_copied.append(name + ("/" if entry.is_dir() else ""))
            continue
        why = not_data(root, entry)
        if why is None:
            carried.append(name)
        else:
            not_copied.append(name + ("/" if entry.is_dir() else ""))
            warnings.append(f"{name} is not copied: {why}")
    return Companions(tuple(carried), tuple(not_copied), tuple(warnings))


def not_data(root: Path, path: Path) -> str | None:
    """Why `path` may not be carried into an output; None when it is a data file inside the folder."""
    if resolved(path) is None:
        return "it is a link that never ends"
    if not within_checkpoint(root, path):  # a link could smuggle any local file (a key) into an upload
        return "it is a link to a file outside the checkpoint folder"
    code = _code_suffix(path.name)
    if code:
        return f"only data files are carried, and .{code} is code"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None if path.is_file() else "it is not a regular file"  # unreadable: `carry` says so
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "it is not a regular file"
        return _code_magic(os.pread(fd, _MAGIC_BYTES, 0))
    except OSError:
        return None  # a read error surfaces when the file is copied, as an input error
    finally:
        os.close(fd)


def _code_suffix(name: str) -> str | None:
    parts = name.lower().rstrip(" .").split(".")[1:]
    return next((p for p in parts if p in CODE_SUFFIXES), None)


def _code_magic(head: bytes) -> str | None:
    for magic, what in _CODE_MAGIC:
        if head.startswith(magic):
            return f"only data files are carried, and it starts like {what}"
    if len(head) >= 4 and head[2:4] == b"\r\n" and not all(32 <= b < 127 for b in head[:2]):
        return "only data files are carried, and it starts like Python bytecode"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "only data files are carried, and it starts like a pickle"
    return None


def carried_size(root: Path, names: tuple[str, ...]) -> int:
    """Bytes the carried files will take (for the free-space check); a file gone or unreadable counts 0
    here, and `carry` reports it."""
    total = 0
    for name in names:
        with contextlib.suppress(OSError):
            total += os.stat(root / name).st_size
    return total


def carry(root: Path, src: Path, dst: Path) -> None:
    """Stream `src` (links inside the folder followed) into the new file `dst`, refusing at the first
    chunk a file that is no longer data; I/O errors name the failing side."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise InputError(f"cannot read {src}: {os_message(e)}") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode) or not within_checkpoint(root, src):
            raise InputError(f"{src} changed while llamapro was reading it (no longer a file in the folder)")
        _stream(fd, src, dst)
    finally:
        os.close(fd)


def _stream(fd: int, src: Path, dst: Path) -> None:
    try:
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise OutputError(f"cannot write {dst}: {os_message(e)}") from e
    try:
        offset = 0
        while True:
            try:
                chunk = os.pread(fd, _COPY_CHUNK, offset)
            except OSError as e:
                raise InputError(f"cannot read {src}: {os_message(e)}") from e
            if not chunk:
                return
            if offset == 0 and (why := _code_magic(chunk[:_MAGIC_BYTES])):
                raise InputError(f"{src} changed while llamapro was reading it ({why})")
            _write_all(out, chunk, dst)
            offset += len(chunk)
    finally:
        os.close(out)


def _write_all(fd: int, data: bytes, dst: Path) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError as e:
        raise OutputError(f"cannot write {dst}: {os_message(e)}") from e
