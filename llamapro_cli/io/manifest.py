"""The record of what `expand` wrote into an output folder, and the proof `--force` needs to delete it.

`write_manifest(folder)` runs last, when a finished output is about to be published: it lists every file
of the folder in `.llamapro-files.json` — name, size, mtime (ns) and, for files up to `HASHED_MAX` bytes,
their sha256. `first_foreign(folder)` finds the first entry of a folder that this record does not vouch
for: anything unlisted (a trainer's `checkpoint-1000/`, `notes.txt`), a link, a sub-folder, a listed file
whose size, mtime or hash changed since — and, with no valid record, every entry. `remove_owned(folder)`
deletes only vouched-for files, then the folder if that left it empty.

The mtime stands in for a hash of the multi-gigabyte shards: a trainer's `save_pretrained` into the
folder rewrites them (new mtime); hashing them would make `--force` read the whole model.

Invariant: `--force` never removes a byte llamapro did not write: only regular files matching their
record are unlinked, links are never followed, sub-folders never entered, and nothing is removed when
anything in the folder is foreign. Must not: follow a symbolic link; read more than `MAX_MANIFEST` bytes
of the record; import anything of the package above `errors`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

MANIFEST = ".llamapro-files.json"
FORMAT = 1
HASHED_MAX = 64 * 1024 * 1024  # files up to this size are hashed: config, index, card, record, tokenizer
MAX_MANIFEST = 16 * 1024 * 1024  # ~100 bytes per file: room for 100,000 files
_HASH_CHUNK = 1 << 20
_NO_RECORD = f"was not written by llamapro expand (the folder has no valid {MANIFEST})"

Entry = dict[str, Any]  # {"size": int, "mtime_ns": int, "sha256": hex or None}


def write_manifest(folder: Path) -> None:
    """Record every file of `folder` (regular files only: a finished output holds nothing else)."""
    files: dict[str, Entry] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        st = entry.stat(follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):  # our own writers create regular files only
            raise OSError(f"{entry.path} is not a regular file")
        sha = _sha256(Path(entry.path)) if st.st_size <= HASHED_MAX else None
        files[entry.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
    text = json.dumps({"llamapro_files": FORMAT, "files": files}, indent=1) + "\n"
    fd = os.open(
        folder / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
    )
    try:
        view = memoryview(text.encode())
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def first_foreign(folder: Path) -> tuple[Path, str] | None:
    """(path, why) of the first entry of `folder` (sorted by name) that llamapro cannot prove it wrote."""
    names = sorted(os.listdir(folder))
    if not names:
        return None
    files = read_manifest(folder)
    if files is None:
        return folder / names[0], _NO_RECORD
    for name in names:
        if name == MANIFEST:
            continue
        why = _entry_problem(folder / name, files.get(name))
        if why is not None:
            return folder / name, why
    return None


def remove_owned(folder: Path) -> tuple[Path, str] | None:
    """Delete `folder` if every entry is vouched for; else leave it whole and return the first foreign one.

    The check runs again here, on the folder renamed aside: whatever was written into it since the first
    check is found now, before a single file is removed."""
    foreign = first_foreign(folder)
    if foreign is not None:
        return foreign
    files = read_manifest(folder) or {}
    for name in files:
        if _entry_problem(folder / name, files[name]) is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folder / name)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(folder / MANIFEST)
    try:
        os.rmdir(folder)
    except OSError:  # something appeared meanwhile: it stays, with the folder
        return folder, "was not empty after removing the files expand wrote"
    return None


def read_manifest(folder: Path) -> dict[str, Entry] | None:
    """The record's {name: entry}, or None when it is missing, a link, not a regular file, too large or
    malformed (every such folder counts as not ours)."""
    try:
        fd = os.open(folder / MANIFEST, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, MAX_MANIFEST + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        doc = json.loads(data) if len(data) <= MAX_MANIFEST else None
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or doc.get("llamapro_files") != FORMAT:
        return None
    files = doc.get("files")
    if not isinstance(files, dict) or "llamapro.json" not in files:  # an expand output has its record
        return None
    if not all(_valid_name(k) and _valid_entry(v) for k, v in files.items()):
        return None
    return files


def _valid_name(name: Any) -> bool:
    return (
        isinstance(name, str)
        and name not in ("", ".", "..", MANIFEST)
        and "/" not in name
        and "\0" not in name
    )


def _valid_entry(entry: Any) -> bool:
    if not isinstance(entry, dict) or set(entry) != {"size", "mtime_ns", "sha256"}:
        return False
    size, mtime, sha = entry["size"], entry["mtime_ns"], entry["sha256"]
    return (
        type(size) is int
        and size >= 0
        and type(mtime) is int
        and (sha is None or (isinstance(sha, str) and len(sha) == 64))
    )


def _entry_problem(path: Path, entry: Entry | None) -> str | None:
    """Why the entry at `path` is not the file the record describes; None when it is."""
    if entry is None:
        return "was not written by llamapro expand"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None  # listed but gone: nothing of it to remove
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link, which llamapro expand never writes"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file, which llamapro expand never writes"
    if (st.st_size, st.st_mtime_ns) != (entry["size"], entry["mtime_ns"]):
        return "changed after llamapro expand wrote it"
    if entry["sha256"] is not None and _sha256(path) != entry["sha256"]:
        return "changed after llamapro expand wrote it"
    return None


def _sha256(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        while chunk := os.read(fd, _HASH_CHUNK):
            digest.update(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    return digest.hexdigest()
