"""The Hugging Face Hub: `inspect` of a repo from its remote headers, and uploading an output folder.

Remote inspect (`open_for_inspect`): config.json (and llamapro.json when present) are downloaded — a few
kilobytes — and the safetensors headers are read over HTTP with huggingface_hub's
`get_safetensors_metadata` (range requests of each shard's first bytes), with each shard's size from
`get_paths_info`; from these we build the same `Header`/`TensorInfo` values a local read gives, so
`describe_checkpoint` cannot tell the difference. With HF_HUB_OFFLINE=1, or when the hub cannot be
reached, the local hub cache is used instead (`snapshot_download(local_files_only=True)`).

Upload (`push_folder`): `create_repo(exist_ok=True)`, `create_branch` for a target branch, then the
folder upload API (`upload_large_folder` where the installed huggingface_hub has it, otherwise
`upload_folder`, which resumes interrupted uploads in huggingface_hub ≥ 1.x with hf_xet). The token is
huggingface_hub's: HF_TOKEN or the stored login.

Invariant: `inspect` never downloads a weight file; only a complete llamapro output is ever uploaded
(never a `*.partial-*` folder or one holding the `.llamapro-partial` marker). Must not: print (the CLI
decides about huggingface_hub's progress bars).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamapro_cli.checkpoint import Checkpoint, cross_check
from llamapro_cli.errors import InputError, OutputError, UsageError
from llamapro_cli.folder import check_within, hub_offline, hub_reachable, refuse_missing_path, resolve
from llamapro_cli.io.files import INDEX_NAME, PROVENANCE_NAME
from llamapro_cli.io.header import DTYPE_BITS, Header, TensorInfo, tensor_nbytes
from llamapro_cli.io.leftovers import MARKER
from llamapro_cli.io.manifest import MANIFEST
from llamapro_cli.io.outdir import is_partial
from llamapro_cli.version import __version__

# Exception class names (anywhere in the MRO) that mean "the hub cannot be reached", across the
# HTTP clients huggingface_hub has used (requests, httpx and its vendored fork).
_UNREACHABLE = frozenset(
    {"TransportError", "TimeoutException", "ConnectionError", "Timeout", "OfflineModeIsEnabled"}
)


class _Unreachable(Exception):
    """Internal: the hub did not answer; the caller falls back to the local cache."""


# --- remote inspect -------------------------------------------------------------------------------------


def open_for_inspect(source: str | Path, *, revision: str | None = None) -> Checkpoint:
    """A folder as `Checkpoint.open` reads it; a repo id from its remote headers (no weights downloaded)."""
    if Path(source).expanduser().exists() or hub_offline():
        return Checkpoint.open(source, revision=revision)
    refuse_missing_path(str(source))  # a mistyped local path fails at once, before any network call
    if not hub_reachable():
        return cached_checkpoint(str(source), revision=revision)
    repo_id = str(source)
    try:
        _validate_repo_id(repo_id)
    except UsageError:
        return Checkpoint.open(source, revision=revision)  # its own "no such folder" error
    try:
        return remote_checkpoint(repo_id, revision=revision)
    except _Unreachable:
        return cached_checkpoint(repo_id, revision=revision)


def cached_checkpoint(repo_id: str, *, revision: str | None = None) -> Checkpoint:
    """The repo's snapshot in the local hub cache, without touching the network."""
    root, _ = resolve(repo_id, revision=revision, local_only=True)
    return dataclasses.replace(Checkpoint.open(root), repo_id=repo_id, revision=revision)


def remote_checkpoint(repo_id: str, *, revision: str | None = None) -> Checkpoint:
    """A `Checkpoint` whose headers were read over HTTP; raises `_Unreachable` when offline."""
    import huggingface_hub

    api = huggingface_hub.HfApi()
    with _inspect_errors(repo_id, revision):
        config = Path(huggingface_hub.hf_hub_download(repo_id, "config.json", revision=revision))
        _optional_download(repo_id, PROVENANCE_NAME, revision)
        meta = api.get_safetensors_metadata(repo_id, revision=revision)
        sizes = _file_sizes(api, repo_id, list(meta.files_metadata), revision)
    root = config.parent  # the snapshot folder of the cache, holding config.json (and llamapro.json)
    headers = {
        name: _header(root / name, f"{repo_id}/{name}", file_meta, sizes.get(name))
        for name, file_meta in meta.files_metadata.items()
    }
    weight_map = {str(k): str(v) for k, v in meta.weight_map.items()}
    if meta.sharded:
        cross_check(Path(f"{repo_id}/{INDEX_NAME}"), weight_map, headers)
    return _assemble(root, headers, weight_map, meta, repo_id=repo_id, revision=revision)


def _assemble(
    root: Path,
    headers: dict[str, Header],
    weight_map: dict[str, str],
    meta: Any,
    *,
    repo_id: str,
    revision: str | None,
) -> Checkpoint:
    # The same steps and checks as Checkpoint.open, with the headers from the hub.
    index_meta = meta.metadata if isinstance(meta.metadata, dict) else {}
    return Checkpoint.assemble(
        root,
        lambda: (headers, weight_map, bool(meta.sharded), dict(index_meta)),
        repo_id=repo_id,
        revision=revision,
        where=f"{repo_id}/config.json",
    )


def _optional_download(repo_id: str, filename: str, revision: str | None) -> Path | None:
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision))
    except LocalEntryNotFoundError:
        raise  # the hub did not answer (not "the file is absent"): the caller falls back to the cache
    except EntryNotFoundError:
        return None


def _file_sizes(api: Any, repo_id: str, files: list[str], revision: str | None) -> dict[str, int]:
    entries = api.get_paths_info(repo_id, files, revision=revision)
    return {str(e.path): int(e.size) for e in entries if getattr(e, "size", None) is not None}


def _header(path: Path, where: str, file_meta: Any, file_size: int | None) -> Header:
    """A `Header` from the metadata API's tensor infos, checked like a local header (dtype, span, layout)."""
    infos = [_tensor(where, str(name), t) for name, t in file_meta.tensors.items()]
    infos.sort(key=lambda t: (t.begin, t.end))
    position = 0
    for t in infos:
        if t.begin != position:
            raise InputError(f"{where}: tensor {t.name!r} does not start where the previous one ends")
        position = t.end
    if file_size is None:
        raise InputError(f"{where}: the hub did not report the file's size")
    header_size = file_size - 8 - position
    if header_size < 2:
        raise InputError(f"{where}: {file_size} bytes cannot hold its header and {position} bytes of data")
    metadata = {str(k): str(v) for k, v in (file_meta.metadata or {}).items()}
    return Header(path, header_size, metadata, {t.name: t for t in infos}, file_size)


def _tensor(where: str, name: str, info: Any) -> TensorInfo:
    dtype, shape = str(info.dtype), tuple(int(d) for d in info.shape)
    begin, end = (int(x) for x in info.data_offsets)
    if dtype not in DTYPE_BITS:
        raise InputError(f"{where}: tensor {name!r} has unknown dtype {dtype!r}")
    try:
        nbytes = tensor_nbytes(dtype, shape)  # as the safetensors library validates it
    except ValueError as e:
        raise InputError(f"{where}: tensor {name!r}: {e}") from e
    if not 0 <= begin <= end or nbytes != end - begin:
        raise InputError(f"{where}: tensor {name!r}: {dtype} shape {shape} does not match its offsets")
    return TensorInfo(name, dtype, shape, begin, end)


@contextlib.contextmanager
def _inspect_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    from huggingface_hub import errors as hf

    try:
        yield
    except Exception as e:
        # hf_hub_download reports an unreachable hub as LocalEntryNotFoundError (not in the cache).
        if _is_unreachable(e) or isinstance(e, hf.LocalEntryNotFoundError):
            raise _Unreachable(str(e)) from e
        login = "log in (HF_TOKEN or `hf auth login`)"
        if isinstance(e, hf.GatedRepoError):
            raise InputError(f"{repo_id} is gated", hint=f"accept its terms on the hub and {login}") from e
        if isinstance(e, hf.RepositoryNotFoundError):
            raise InputError(f"{repo_id}: no such model on the hub", hint=f"check the name; {login}") from e
        if isinstance(e, hf.RevisionNotFoundError):
            raise InputError(f"{repo_id}: no revision {revision!r} on the hub") from e
        if isinstance(e, hf.EntryNotFoundError):
            raise InputError(f"{repo_id}: no config.json on the hub") from e
        if isinstance(e, hf.NotASafetensorsRepoError):
            raise InputError(
                f"{repo_id}: no model.safetensors or {INDEX_NAME} on the hub",
                hint="llamapro reads safetensors checkpoints only",
            ) from e
        if isinstance(e, hf.SafetensorsParsingError | hf.HfHubHTTPError | OSError | ValueError):
            raise InputError(f"{repo_id}: cannot read from the hub: {_first_line(e)}") from e
        raise


def _is_unreachable(error: BaseException) -> bool:
    names = {cls.__name__ for cls in type(error).__mro__}
    if names & _UNREACHABLE:
        return True
    response = getattr(error, "response", None)  # hub downtime (5xx) reads like no network
    return "HfHubHTTPError" in names and getattr(response, "status_code", 0) >= 500


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# --- upload ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushReport:
    """What `push` uploaded. `--json` prints exactly this."""

    folder: str
    repo_id: str
    branch: str | None  # None: the repo's default branch
    private: bool | None  # None: left as it is (a new repo is public unless the account defaults otherwise)
    url: str
    commit: str | None  # the commit id when the upload API reports one
    files: int
    bytes: int
    method: str  # the huggingface_hub API used: upload_large_folder or upload_folder
    seconds: float


def check_can_push(repo_id: str) -> None:
    """Fail fast, before a long expand: the repo id is valid and a token is available."""
    import huggingface_hub

    _validate_repo_id(repo_id)
    if huggingface_hub.get_token() is None:
        raise OutputError(
            f"cannot push to {repo_id}: not logged in to the Hugging Face Hub",
            hint="set HF_TOKEN or run `hf auth login` (a token with write access)",
        )


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    branch: str | None = None,
    commit_message: str | None = None,
) -> PushReport:
    """Upload a complete llamapro output folder to the hub repo `repo_id` (created when missing)."""
    import huggingface_hub

    started = time.monotonic()
    path = _complete_output(Path(folder))
    check_can_push(repo_id)
    files = [p for p in sorted(path.rglob("*")) if p.is_file() and not _ignored(p.relative_to(path))]
    for file in files:  # never upload a file from outside the folder through a link placed in it
        check_within(path, file, "a file to upload")
    message = commit_message or f"Upload {path.name} (expanded by llamapro {__version__})"
    api = huggingface_hub.HfApi()
    with _upload_errors(repo_id):
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if branch:
            api.create_branch(repo_id, branch=branch, exist_ok=True, repo_type="model")
        method, commit = _upload(api, path, repo_id, branch=branch, private=private, message=message)
    return PushReport(
        folder=str(path),
        repo_id=repo_id,
        branch=branch,
        private=private,
        url=str(url) + (f"/tree/{branch}" if branch else ""),
        commit=commit,
        files=len(files),
        bytes=sum(p.stat().st_size for p in files),
        method=method,
        seconds=round(time.monotonic() - started, 3),
    )


def _upload(
    api: Any, folder: Path, repo_id: str, *, branch: str | None, private: bool | None, message: str
) -> tuple[str, str | None]:
    large = getattr(api, "upload_large_folder", None)
    if large is not None:  # resumable: many commits, progress kept in <folder>/.cache/huggingface
        # Its periodic report is printed on stdout, which carries only our data: send it to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            large(
                repo_id=repo_id,
                folder_path=folder,
                repo_type="model",
                revision=branch,
                private=private,
                ignore_patterns=[MANIFEST],
            )
        return "upload_large_folder", None
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        repo_type="model",
        revision=branch,
        commit_message=message,
        ignore_patterns=[MANIFEST],  # our record of what expand wrote, for --force; not the model's
    )
    return "upload_folder", getattr(info, "oid", None)


def _complete_output(folder: Path) -> Path:
    """The folder, resolved, if it is a finished llamapro output whose checkpoint reads cleanly."""
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    path = folder.resolve()
    if is_partial(path) or fnmatch.fnmatch(path.name, "*.partial-*") or (path / MARKER).exists():
        raise InputError(
            f"{folder} is the temporary folder of an unfinished llamapro expand; it is never uploaded",
            hint="push the finished --out folder once expand has completed",
        )
    if not (path / PROVENANCE_NAME).is_file():
        raise InputError(
            f"{folder} has no {PROVENANCE_NAME}: not a llamapro output",
            hint="llamapro push uploads expand outputs; use `hf upload` for other folders",
        )
    Checkpoint.open(path)  # config, index and every shard header agree, or InputError
    return path


def _ignored(relative: Path) -> bool:
    # What huggingface_hub skips by default (.git, its own .cache/huggingface) and our --force record,
    # so counts match the upload.
    return any(part in {".git", ".cache"} for part in relative.parts) or relative.name == MANIFEST


@contextlib.contextmanager
def _upload_errors(repo_id: str) -> Iterator[None]:
    try:
        yield
    except Exception as e:
        if _is_unreachable(e):
            raise OutputError(
                f"cannot upload to {repo_id}: the hub cannot be reached ({_first_line(e)})",
                hint="check the network and rerun the same push; finished files are not sent again",
            ) from e
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise OutputError(
                f"cannot upload to {repo_id}: permission denied ({status})",
                hint="use a token with write access to this repo (HF_TOKEN or `hf auth login`)",
            ) from e
        from huggingface_hub.errors import HfHubHTTPError

        # Anything the hub client raises for a failed transfer; other exceptions are bugs (exit 101).
        if isinstance(e, HfHubHTTPError | OSError | ValueError | RuntimeError) or status:
            raise OutputError(f"cannot upload to {repo_id}: {type(e).__name__}: {_first_line(e)}") from e
        raise


def _validate_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]

    try:
        validate_repo_id(repo_id)
    except ValueError as e:
        raise UsageError(f"{repo_id!r} is not a hub repo id: {_first_line(e)}", hint="e.g. org/name") from e
