"""The hub, with huggingface_hub's client replaced by fakes (no network here): uploads (`expand
--push-to-hub`, `push`) send the finished folder with the right repo/branch/private flags and never a
partial one; remote `inspect` reads headers only and equals a local inspect; offline (HF_HUB_OFFLINE=1)
`inspect` and `expand` resolve repo ids from a hub cache built in the fixture."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import huggingface_hub
import pytest
import tiny_models
from huggingface_hub import HfApi, ModelCard
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo
from typer.testing import CliRunner

from llamapro_cli.cli.app import app
from llamapro_cli.demo import write_demo_checkpoint
from llamapro_cli.expand import expand
from llamapro_cli.io.manifest import MANIFEST

REPO = "org/tiny-pro"
SHA = "0123456789abcdef0123456789abcdef01234567"
REAL_SNAPSHOT_DOWNLOAD = huggingface_hub.snapshot_download


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_checkpoint(tmp_path_factory.mktemp("hub") / "llama", layers=8)


@pytest.fixture(scope="module")
def expanded(demo: Path) -> Path:
    out = demo.parent / "pro"
    expand(demo, out, every=4)
    return out


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and len(lines) <= 2, stderr
    assert all(line.startswith("hint: ") for line in lines[1:]), stderr
    return lines[0]


# --- upload, with a fake client -------------------------------------------------------------------------


class FakeHub:
    """Records every HfApi call; the upload call snapshots the folder as it is at that moment."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, large: bool, fail: Exception | None) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.uploaded: dict[str, bytes] = {}
        self.fail = fail
        monkeypatch.setenv("HF_TOKEN", "hf_fake_token")
        monkeypatch.setattr(HfApi, "create_repo", self.create_repo)
        monkeypatch.setattr(HfApi, "create_branch", self.create_branch)
        monkeypatch.setattr(HfApi, "upload_folder", self.upload_folder)
        if large:
            monkeypatch.setattr(HfApi, "upload_large_folder", self.upload_large_folder, raising=False)
        else:
            monkeypatch.delattr(HfApi, "upload_large_folder", raising=False)

    def create_repo(self, repo_id: str, **kw: Any) -> str:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id: str, **kw: Any) -> None:
        self.calls.append(("create_branch", {"repo_id": repo_id, **kw}))

    def _upload(self, name: str, kw: dict[str, Any]) -> None:
        self.calls.append((name, kw))
        folder = Path(kw["folder_path"])
        ignored = kw.get("ignore_patterns") or []
        self.uploaded = {
            str(p.relative_to(folder)): p.read_bytes()
            for p in folder.rglob("*")
            if p.is_file() and not any(fnmatch.fnmatch(str(p.relative_to(folder)), g) for g in ignored)
        }
        if self.fail is not None:
            raise self.fail

    def upload_folder(self, **kw: Any) -> Any:
        self._upload("upload_folder", kw)
        return SimpleNamespace(oid="c0ffee" * 6 + "abcd")

    def upload_large_folder(self, **kw: Any) -> None:
        print("report: 3 files committed")  # huggingface_hub prints its progress report on stdout
        self._upload("upload_large_folder", kw)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeHub]:
    def make(*, large: bool = False, fail: Exception | None = None) -> FakeHub:
        return FakeHub(monkeypatch, large=large, fail=fail)

    return make


def _http_error(status: int) -> hf_errors.HfHubHTTPError:
    response = SimpleNamespace(status_code=status, headers={}, request=None)
    return hf_errors.HfHubHTTPError(f"{status} Client Error: Forbidden for url", response=response)  # type: ignore[arg-type]


def test_expand_push_uploads_the_finished_folder(
    demo: Path, tmp_path: Path, fake_hub: Callable[..., FakeHub]
) -> None:
    hub = fake_hub()
    out = tmp_path / "pro"
    args = ["--in", str(demo), "--out", str(out), "--push-to-hub", REPO, "--private", "--push-branch", "exp"]
    result = _invoke("expand", "--every", "4", *args)
    assert result.exit_code == 0, result.stderr
    assert hub.names() == ["create_repo", "create_branch", "upload_folder"]
    assert hub.calls[0][1] == {"repo_id": REPO, "private": True, "exist_ok": True, "repo_type": "model"}
    assert hub.calls[1][1] == {"repo_id": REPO, "branch": "exp", "exist_ok": True, "repo_type": "model"}
    upload = hub.calls[2][1]
    assert Path(upload["folder_path"]) == out.resolve() and upload["revision"] == "exp"
    # What was sent is exactly the finished output: no marker, no record of our own files for --force,
    # every file byte-identical.
    assert ".llamapro-partial" not in hub.uploaded and MANIFEST not in hub.uploaded
    assert hub.uploaded == {p.name: p.read_bytes() for p in out.iterdir() if p.name != MANIFEST}
    assert {"README.md", "llamapro.json", "config.json"} <= set(hub.uploaded)
    card = ModelCard(hub.uploaded["README.md"].decode())
    assert card.data.to_dict()["tags"] == ["llama-pro", "block-expansion"]
    assert f"llamapro freeze-map {REPO} --format hf" in card.text  # the card names the pushed repo
    assert result.stderr.strip().endswith(
        f"pushed {len(hub.uploaded)} files to https://huggingface.co/{REPO}/tree/exp"
    )


def test_push_command_json_and_large_folder_api(expanded: Path, fake_hub: Callable[..., FakeHub]) -> None:
    hub = fake_hub(large=True)
    result = _invoke("push", str(expanded), REPO, "--json")
    assert result.exit_code == 0, result.stderr
    assert hub.names() == ["create_repo", "upload_large_folder"]  # no branch asked: none created
    assert hub.calls[0][1]["private"] is None  # no --private: an existing repo keeps its visibility
    upload = hub.calls[1][1]
    assert upload == {
        "repo_id": REPO,
        "folder_path": expanded.resolve(),
        "repo_type": "model",
        "revision": None,
        "private": None,
        "ignore_patterns": [MANIFEST],
    }
    doc = json.loads(result.stdout)  # stdout is the document only; the hub's report went to stderr
    assert "report: 3 files committed" in result.stderr
    files = [p for p in expanded.iterdir() if p.is_file() and p.name != MANIFEST]
    assert doc["schema_version"] == 1 and doc["method"] == "upload_large_folder"
    assert doc["files"] == len(files) and doc["bytes"] == sum(p.stat().st_size for p in files)
    assert doc["url"] == f"https://huggingface.co/{REPO}" and doc["commit"] is None


def test_push_table_reports_commit(expanded: Path, fake_hub: Callable[..., FakeHub]) -> None:
    fake_hub()
    result = _invoke("push", str(expanded), REPO, "--branch", "v1")
    assert result.exit_code == 0, result.stderr
    assert "upload_folder" in result.stdout and "c0ffee" in result.stdout and "branch v1" in result.stdout


@pytest.mark.parametrize("kind", ["name", "marker"])
def test_partial_folders_are_never_uploaded(
    expanded: Path, tmp_path: Path, fake_hub: Callable[..., FakeHub], kind: str
) -> None:
    hub = fake_hub()
    if kind == "name":
        partial = shutil.copytree(expanded, tmp_path / "pro.partial-1a2b3c4d")
    else:
        partial = shutil.copytree(expanded, tmp_path / "pro")
        (partial / ".llamapro-partial").write_text(json.dumps({"pid": os.getpid()}))
    result = _invoke("push", str(partial), REPO)
    assert result.exit_code == 3
    assert "unfinished llamapro expand" in _one_error_line(result.stderr)
    assert hub.calls == [] and result.stdout == ""


def test_push_never_uploads_a_file_from_outside_the_folder(
    expanded: Path, tmp_path: Path, fake_hub: Callable[..., FakeHub]
) -> None:
    # A link placed into a finished output (by hand, by a script) must not carry a private file up.
    hub = fake_hub()
    secret = tmp_path / "id_ed25519"
    secret.write_text("PRIVATE KEY")
    pro = shutil.copytree(expanded, tmp_path / "pro")
    (pro / "notes.txt").symlink_to(secret)
    result = _invoke("push", str(pro), REPO)
    assert result.exit_code == 3
    assert "notes.txt" in _one_error_line(result.stderr) and "outside the checkpoint folder" in result.stderr
    assert hub.calls == [] and result.stdout == ""


def test_push_refuses_non_outputs_and_bad_repo_ids(
    demo: Path, expanded: Path, fake_hub: Callable[..., FakeHub]
) -> None:
    hub = fake_hub()
    result = _invoke("push", str(demo), REPO)  # a checkpoint, but not a llamapro output
    assert result.exit_code == 3 and "not a llamapro output" in _one_error_line(result.stderr)
    result = _invoke("push", str(expanded), "org/bad--name")
    assert result.exit_code == 2 and "not a hub repo id" in _one_error_line(result.stderr)
    assert hub.calls == []


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (_http_error(403), "permission denied (403)"),
        (ConnectionError("network is unreachable"), "the hub cannot be reached"),
        (_http_error(413), "413 Client Error"),
    ],
)
def test_upload_errors_are_one_line_exit_4(
    expanded: Path, fake_hub: Callable[..., FakeHub], error: Exception, message: str
) -> None:
    fake_hub(fail=error)
    result = _invoke("push", str(expanded), REPO)
    assert result.exit_code == 4
    assert message in _one_error_line(result.stderr) and result.stdout == ""


def test_expand_then_failed_push_keeps_output_and_says_how_to_retry(
    demo: Path, tmp_path: Path, fake_hub: Callable[..., FakeHub]
) -> None:
    fake_hub(fail=_http_error(403))
    out = tmp_path / "pro"
    result = _invoke(
        "expand", "--every", "4", "--in", str(demo), "--out", str(out), "--push-to-hub", REPO, "-q"
    )
    assert result.exit_code == 4
    _one_error_line(result.stderr)
    assert f"retry with: llamapro push {out} {REPO}" in result.stderr
    assert (out / "llamapro.json").is_file()


def test_push_options_are_checked_before_any_work(
    demo: Path, tmp_path: Path, fake_hub: Callable[..., FakeHub], monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = fake_hub()
    out = tmp_path / "pro"
    base = ["expand", "--every", "4", "--in", str(demo), "--out", str(out)]
    assert _invoke(*base, "--private").exit_code == 2
    assert _invoke(*base, "--push-to-hub", REPO, "--dry-run").exit_code == 2
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # no HF_TOKEN, no stored login
    result = _invoke(*base, "--push-to-hub", REPO)
    assert result.exit_code == 4 and "not logged in" in _one_error_line(result.stderr)
    assert not out.exists() and hub.calls == []


# --- remote inspect, with a fake client -----------------------------------------------------------------


def _file_metadata(path: Path) -> SafetensorsFileMetadata:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    tensors = {k: TensorInfo(v["dtype"], v["shape"], tuple(v["data_offsets"])) for k, v in header.items()}
    return SafetensorsFileMetadata(metadata=meta, tensors=tensors)


class FakeRemote:
    """A hub serving `folder`'s small files by download and its shard headers by the metadata API."""

    def __init__(self, folder: Path, snapshot: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.folder, self.snapshot = folder, snapshot
        self.downloads: list[str] = []
        self.error: Exception | None = None
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", self.hf_hub_download)
        monkeypatch.setattr(HfApi, "get_safetensors_metadata", self.get_safetensors_metadata)
        monkeypatch.setattr(HfApi, "get_paths_info", self.get_paths_info)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.no_snapshot)

    def hf_hub_download(self, repo_id: str, filename: str, **kw: Any) -> str:
        self.downloads.append(filename)
        if self.error is not None:
            raise self.error
        if not (self.folder / filename).is_file():
            raise hf_errors.EntryNotFoundError(f"{filename} not found")
        self.snapshot.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.folder / filename, self.snapshot / filename)
        return str(self.snapshot / filename)

    def get_safetensors_metadata(self, repo_id: str, **kw: Any) -> SafetensorsRepoMetadata:
        if self.error is not None:
            raise self.error
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            doc = json.loads(index.read_text())
            files = dict.fromkeys(doc["weight_map"].values())
            return SafetensorsRepoMetadata(
                metadata=doc["metadata"],
                sharded=True,
                weight_map=doc["weight_map"],
                files_metadata={f: _file_metadata(self.folder / f) for f in files},
            )
        single = _file_metadata(self.folder / "model.safetensors")
        weight_map = dict.fromkeys(single.tensors, "model.safetensors")
        return SafetensorsRepoMetadata(
            metadata=None, sharded=False, weight_map=weight_map, files_metadata={"model.safetensors": single}
        )

    def get_paths_info(self, repo_id: str, paths: list[str], **kw: Any) -> list[Any]:
        return [SimpleNamespace(path=p, size=(self.folder / p).stat().st_size) for p in paths]

    def no_snapshot(self, *args: Any, **kw: Any) -> str:
        raise AssertionError("remote inspect must not download a snapshot")


@pytest.fixture
def remote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], FakeRemote]:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("llamapro_cli.hub.hub_reachable", lambda: True)  # the fake client is the hub
    return lambda folder: FakeRemote(folder, tmp_path / "snapshot", monkeypatch)


@pytest.mark.parametrize("which", ["demo", "expanded"])
def test_remote_inspect_reads_headers_only(
    demo: Path, expanded: Path, remote: Callable[[Path], FakeRemote], which: str
) -> None:
    folder = demo if which == "demo" else expanded
    fake = remote(folder)
    result = _invoke("inspect", REPO, "--json")
    assert result.exit_code == 0, result.stderr
    assert fake.downloads == ["config.json", "llamapro.json"]  # no weight file is ever requested
    doc = json.loads(result.stdout)
    local = json.loads(_invoke("inspect", str(folder), "--json").stdout)
    assert doc["repo_id"] == REPO and doc["path"] == str(fake.snapshot)
    for key in ("path", "repo_id"):
        del doc[key], local[key]
    assert doc == local  # shards (sizes included), dtypes, parameters, expansion: all the same


def test_remote_inspect_single_file_and_table(tmp_path: Path, remote: Callable[[Path], FakeRemote]) -> None:
    single = tmp_path / "single"
    expand(
        tiny_models.one_file(write_demo_checkpoint(tmp_path / "d", layers=4)),
        single,
        every=2,
        max_shard_size="1GB",
    )
    assert (single / "model.safetensors").exists()
    remote(single)
    result = _invoke("inspect", REPO)
    assert result.exit_code == 0, result.stderr
    assert REPO in result.stdout and "1 shard(s)" in result.stdout and "2<-1" in result.stdout


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (hf_errors.NotASafetensorsRepoError("no safetensors"), "no model.safetensors"),
        (hf_errors.GatedRepoError("gated", response=SimpleNamespace(headers={}, request=None)), "is gated"),  # type: ignore[arg-type]
        (hf_errors.SafetensorsParsingError("bad header"), "cannot read from the hub"),
    ],
)
def test_remote_inspect_errors(
    demo: Path, remote: Callable[[Path], FakeRemote], error: Exception, message: str
) -> None:
    remote(demo).error = error
    result = _invoke("inspect", REPO)
    assert result.exit_code == 3
    assert message in _one_error_line(result.stderr) and result.stdout == ""


UNREACHABLE = [
    ConnectionError("Name or service not known"),
    hf_errors.LocalEntryNotFoundError("cannot find the requested files in the local cache"),
]


@pytest.mark.parametrize("error", UNREACHABLE, ids=["connection", "hf_hub_download"])
def test_remote_inspect_unreachable_falls_back_to_the_cache(
    demo: Path,
    remote: Callable[[Path], FakeRemote],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
) -> None:
    remote(demo).error = error
    # The fallback is the real snapshot_download, local files only.
    monkeypatch.setattr(huggingface_hub, "snapshot_download", REAL_SNAPSHOT_DOWNLOAD)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    result = _invoke("inspect", REPO)
    assert result.exit_code == 3
    assert "not in the local hub cache" in _one_error_line(result.stderr)
    snapshot = _hub_cache(tmp_path / "cache", REPO, demo)
    result = _invoke("inspect", REPO, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["repo_id"] == REPO and doc["path"] == str(snapshot) and doc["num_layers"] == 8


# --- offline: a hub cache built in the fixture ----------------------------------------------------------


def _hub_cache(root: Path, repo_id: str, folder: Path) -> Path:
    """`models--org--name/{blobs,snapshots/<sha>,refs/main}` as huggingface_hub lays it out (symlinks)."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / SHA
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in folder.iterdir():
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    return snapshot


@pytest.fixture
def offline_cache(demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub-cache"
    snapshot = _hub_cache(cache, "org/tiny", demo)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at import

    def network(*args: Any, **kw: Any) -> Any:
        raise AssertionError("offline: no network call")

    monkeypatch.setattr(HfApi, "get_safetensors_metadata", network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", network)
    return snapshot


def test_offline_inspect_uses_the_cache(demo: Path, offline_cache: Path) -> None:
    result = _invoke("inspect", "org/tiny", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    local = json.loads(_invoke("inspect", str(demo), "--json").stdout)
    assert doc["repo_id"] == "org/tiny" and doc["path"] == str(offline_cache)
    assert doc["parameters"] == local["parameters"] and doc["shards"] == local["shards"]
    missing = _invoke("inspect", "org/absent")
    assert missing.exit_code == 3 and "not in the local hub cache" in _one_error_line(missing.stderr)


@pytest.mark.parametrize("revision", [None, SHA])
def test_offline_expand_from_repo_id(
    offline_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, revision: str | None
) -> None:
    out = tmp_path / "pro"
    args = ["expand", "--every", "4", "--in", "org/tiny", "--out", str(out), "--quiet"]
    args += ["--revision", revision] if revision else []
    monkeypatch.setattr(sys, "argv", ["llamapro", *args])
    result = _invoke(*args)
    assert result.exit_code == 0, result.stderr
    record = json.loads((out / "llamapro.json").read_text())
    assert record["source"]["repo_id"] == "org/tiny" and record["source"]["path"] is None
    assert record["source"]["revision"] == revision
    assert not any(p.is_symlink() for p in out.iterdir())  # hub-cache symlinks followed: real files
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "org/tiny" and data["base_model_relation"] == "finetune"
    assert "[org/tiny](https://huggingface.co/org/tiny)" in card.text
    assert " ".join(args) in card.text  # the command as typed
    assert "Seeded random weights" in card.text  # the cached README, below its heading


# --- a mistyped local path is not a repo id; an unreachable hub is said at once -------------------------


def test_a_mistyped_local_path_fails_at_once_without_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "realclient" / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("a mistyped path must not reach the network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.setattr("socket.create_connection", no_network)
    for command in (["inspect", "realclient/bse"], ["expand", "--every", "2", "--in", "realclient/bse"]):
        args = [*command, "--out", str(tmp_path / "out")] if command[0] == "expand" else command
        started = time.monotonic()
        result = CliRunner().invoke(app, args)
        assert time.monotonic() - started < 1.0
        assert result.exit_code == 3, result.stderr
        assert result.stderr.splitlines() == [
            "error: realclient/bse: no such folder",
            "hint: did you mean realclient/base?",
        ]


def test_an_unreachable_hub_is_one_quick_line_with_a_fitting_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")  # discard: refused
    for args in (["inspect", "someorg/somemodel"], ["freeze-map", "someorg/somemodel"]):
        started = time.monotonic()
        result = CliRunner().invoke(app, args)
        assert time.monotonic() - started < 5.0
        assert result.exit_code == 3, result.stderr
        lines = result.stderr.splitlines()
        assert (
            lines[0] == "error: someorg/somemodel: not in the local hub cache and the hub cannot be reached"
        )
        assert "HF_HUB_OFFLINE" not in result.stderr and "hf download someorg/somemodel" in lines[1]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, ["inspect", "someorg/somemodel"])
    assert result.exit_code == 3 and "hint: unset HF_HUB_OFFLINE" in result.stderr
