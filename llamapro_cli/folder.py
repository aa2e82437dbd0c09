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
    refuse_missing_path(text)
    return _snapshot(text, revision, local_only=local_only or hub_offline() or not hub_reachable()), text


def refuse_missing_path(text: str) -> None:
    """A path-looking argument that names nothing is a mistyped path, not a hub repo id: say so at once,
    before any network call. Path-looking: not `org/name`, or starting with `.`, `/` or `~`, or whose
    `org` part is an existing local folder (`./realclient/bse` typed as `realclient/bse`)."""
    path = Path(text).expanduser()
    if not _REPO_ID.match(text) or text.startswith((".", "/", "~")) or path.parent.is_dir():
        siblings = _similar(path)
        hint = (
            f"did you mean {siblings}?" if siblings else "give a checkpoint folder or a hub repo id org/name"
        )
        raise InputError(f"{path}: no such folder", hint=hint)


def _similar(path: Path) -> str:
    """Folders beside a mistyped one whose names are close to it (at most three)."""
    import difflib

    try:
        names = [p.name for p in path.parent.iterdir() if p.is_dir()] if path.parent.is_dir() else []
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names, n=3, cutoff=0.6)
    return ", ".join(str(path.parent / name) for name in close)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers at all (a name lookup and a TCP connect, at most `timeout` s).

    huggingface_hub retries a failed connection with back-off for about 25 s; a host that does not resolve
    or refuses the connection will not answer the retries either, so we ask once and then read the local
    cache. Behind a proxy (HTTPS_PROXY/HTTP_PROXY/ALL_PROXY) only the proxy can tell: we do not probe."""
    import socket
    from urllib.parse import urlsplit

    if any(
        os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")
    ):
        return True
    import huggingface_hub.constants

    url = urlsplit(huggingface_hub.constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


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
        offline = os.environ.get("HF_HUB_OFFLINE") is not None and hub_offline()
        raise InputError(
            f"{repo_id}: not in the local hub cache"
            + (" (HF_HUB_OFFLINE is set)" if offline else " and the hub cannot be reached"),
            hint="unset HF_HUB_OFFLINE to download it"
            if offline
            else f"check the name, or download it where the hub can be reached (hf download {repo_id})",
        ) from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise InputError(f"{repo_id}: cannot resolve on the hub: {_first_line(e)}") from e
    return Path(folder)


def check_within(root: Path, path: Path, what: str) -> None:
    """Refuse (exit 3) a file of the checkpoint that is a link out of the folder: its bytes would reach
    the output (copied shards, the rewritten config) or a hub upload."""
    if not within_checkpoint(root, path):
        target = resolved(path)
        where = f"a link to {target}, outside the checkpoint folder" if target else "a link that never ends"
        raise InputError(
            f"{path}: {what} is {where}",
            hint="copy the file into the folder (links are followed only inside it, or into the hub cache)",
        )


def within_checkpoint(root: Path, path: Path) -> bool:
    """Whether `path`, links followed, stays inside the checkpoint folder `root` (or, for a hub cache
    snapshot, in that repo's `blobs/`). Files copied verbatim into an output must: a link in a
    downloaded folder could otherwise smuggle any local file (a key, a token) into a model upload.
    A link loop leads nowhere inside: False."""
    target, base = resolved(path), resolved(root)
    if target is None or base is None:
        return False
    areas = [base]
    if base.parent.name == "snapshots":  # <cache>/models--org--name/snapshots/<rev> -> ../../blobs/
        areas.append(base.parent.parent / "blobs")
    return any(target.is_relative_to(area) for area in areas)


def resolved(path: Path) -> Path | None:
    """`path` with every link followed; None for a link loop (Python 3.11 raises RuntimeError for one,
    3.13 OSError) — never an exception from a hostile folder."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
