"""Where a checkpoint's files are: a local folder, or a hub repo id resolved to its cache snapshot; and
which paths belong to that folder.

`resolve()` gives a readable local folder (a folder we cannot list or search is one `cannot read` line,
exit 3; a temporary folder of an unfinished expand is refused). `within_checkpoint()` says whether a
path, links followed, stays inside the folder or, for a hub-cache snapshot, inside that repository's
`blobs/`; `check_within()` refuses (exit 3) a file whose bytes would reach an output or an upload
otherwise — shards, config, index, record, carried files all follow this one rule.

Invariant: a link is followed only to a place inside the checkpoint (or its repo's blobs). Must not:
read file contents; write anything.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from llamapro_cli.errors import InputError
from llamapro_cli.io.files import os_message
from llamapro_cli.io.outdir import is_partial

# What a hub download needs: weights, config, index, provenance, and the files `expand` carries over.
HUB_ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
    "*.md",
    "LICENSE*",
    "NOTICE*",
    "USE_POLICY*",
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(
    source: str | Path, *, revision: str | None = None, local_only: bool = False
) -> tuple[Path, str | None]:
    """A local folder, or a hub repo id resolved to its snapshot folder (downloaded when online).

    `local_only` (or HF_HUB_OFFLINE=1) never touches the network: the repo must be in the hub cache.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        _check_readable(path)
        if is_partial(path.resolve()):
            raise InputError(
                f"{path} is the temporary folder of an unfinished llamapro expand, not a checkpoint",
                hint="it was interrupted or is still running; rerun expand to the same --out",
            )
        return path.resolve(), None
    if path.exists():
        raise InputError(f"{path} is a file; expected a checkpoint folder or a hub repo id")
    text = str(source)
    if not _REPO_ID.match(text) or text.startswith((".", "/", "~")):
        raise InputError(f"{path}: no such folder", hint="give a checkpoint folder or a hub repo id org/name")
    return _snapshot(text, revision, local_only=local_only or hub_offline()), text


def _check_readable(folder: Path) -> None:
    """A folder we may list and search, or one `cannot read` line (exit 3), never a bare PermissionError
    from whichever check first looks inside (a 0700 folder of another user)."""
    try:
        os.listdir(folder)  # read permission
        os.stat(folder / ".")  # search permission: a lookup inside the folder
    except OSError as e:
        raise InputError(f"cannot read {folder}: {os_message(e)}") from e


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    import huggingface_hub.constants

    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        return bool(huggingface_hub.constants.HF_HUB_OFFLINE)
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _snapshot(repo_id: str, revision: str | None, *, local_only: bool) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS, local_files_only=local_only
        )
    except LocalEntryNotFoundError as e:
        raise InputError(
            f"{repo_id}: not in the local hub cache and the hub cannot be reached",
            hint="download it first (hf download) or unset HF_HUB_OFFLINE",
        ) from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise InputError(f"{repo_id}: cannot resolve on the hub: {_first_line(e)}") from e
    return Path(folder)


def check_within(root: Path, path: Path, what: str) -> None:
    """Refuse (exit 3) a file of the checkpoint that is a link out of the folder: its bytes would reach
    the output (copied shards, the rewritten config) or a hub upload."""
    if not within_checkpoint(root, path):
        raise InputError(
            f"{path}: {what} is a link to {path.resolve()}, outside the checkpoint folder",
            hint="copy the file into the folder (links are followed only inside it, or into the hub cache)",
        )


def within_checkpoint(root: Path, path: Path) -> bool:
    """Whether `path`, links followed, stays inside the checkpoint folder `root` (or, for a hub cache
    snapshot, in that repo's `blobs/`). Files copied verbatim into an output must: a link in a
    downloaded folder could otherwise smuggle any local file (a key, a token) into a model upload."""
    target = path.resolve()
    areas = [root.resolve()]
    if areas[0].parent.name == "snapshots":  # <cache>/models--org--name/snapshots/<rev> -> ../../blobs/
        areas.append(areas[0].parent.parent / "blobs")
    return any(target.is_relative_to(area) for area in areas)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
