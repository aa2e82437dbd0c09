"""`llamapro push` (library twin: `hub.push_folder`), the `expand --push-to-hub` steps, and the table of
a `PushReport`.

Invariant: push options are checked before any work (repo id, token), so `expand --push-to-hub` never
writes a model it then cannot upload for a reason known up front.
Must not: import huggingface_hub at module level (`llamapro --help` stays fast).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from llamapro_cli.cli import console
from llamapro_cli.cli.console import human_bytes
from llamapro_cli.cli.options import CommandSpec, JsonOpt, PrivateOpt, QuietOpt

if TYPE_CHECKING:
    from llamapro_cli.hub import PushReport

EXAMPLES = (
    "llamapro push ./pro-8b me/llama-2-7b-pro --private",
    "llamapro push ./pro-8b me/llama-2-7b-pro --branch every-4 --json",
)
AFTER_EXAMPLES = (
    "The token is HF_TOKEN or the stored login (hf auth login). Exit codes: 0 uploaded; 2 bad repo id;\n"
    "3 not a finished llamapro output (a .partial-* folder is never uploaded); 4 upload failed."
)


def push(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="A finished llamapro expand output folder.")],
    repo_id: Annotated[
        str, typer.Argument(metavar="REPO_ID", help="The hub model repo (org/name), created if missing.")
    ],
    private: PrivateOpt = False,
    branch: Annotated[
        str | None,
        typer.Option(
            "--branch", "--push-branch", metavar="BRANCH", help="Upload to this branch (created if missing)."
        ),
    ] = None,
    quiet: QuietOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Upload an expand output folder to the Hugging Face Hub (resumable: rerun to finish).

    Checks the folder first: a complete llamapro output whose config, index and shard headers agree.
    Uses huggingface_hub's folder upload (upload_large_folder where available, else upload_folder).
    """
    from llamapro_cli.hub import push_folder

    _hub_progress(quiet=quiet or json_)
    report = push_folder(folder, repo_id, private=private or None, branch=branch)
    if json_:
        console.print_json(report)
    else:
        render_push(report)


COMMAND = CommandSpec("push", push, EXAMPLES, after=AFTER_EXAMPLES)


def render_push(report: PushReport) -> None:
    """What `push` uploaded."""
    rows = [
        ("folder", report.folder),
        ("repo", report.repo_id + (f" (branch {report.branch})" if report.branch else "")),
        ("url", report.url),
        ("uploaded", f"{report.files} files, {human_bytes(report.bytes)} ({report.method})"),
    ]
    if report.private is not None:
        rows.append(("private", "yes" if report.private else "no"))
    if report.commit:
        rows.append(("commit", report.commit))
    console.print_rows(rows)


def check_push_options(repo_id: str | None, *, private: bool, branch: str | None, dry_run: bool) -> None:
    """Before any work: push options make sense together, and the push can succeed (repo id, token)."""
    from llamapro_cli.errors import UsageError

    if repo_id is None:
        if private or branch:
            raise UsageError("--private and --push-branch need --push-to-hub REPO_ID")
        return
    if dry_run:
        raise UsageError("--push-to-hub cannot be combined with --dry-run (nothing is written)")
    from llamapro_cli.hub import check_can_push

    check_can_push(repo_id)


def push_after_expand(folder: Path, repo_id: str, *, private: bool, branch: str | None, quiet: bool) -> None:
    """`expand --push-to-hub`: upload the finished folder; a failure says how to retry the upload alone."""
    from llamapro_cli.errors import OutputError
    from llamapro_cli.hub import push_folder

    _hub_progress(quiet=quiet)
    try:
        pushed = push_folder(folder, repo_id, private=private or None, branch=branch)
    except OutputError as e:
        retry = f"{folder} is complete; retry with: llamapro push {folder} {repo_id}"
        raise OutputError(e.message, hint=f"{e.hint}; {retry}" if e.hint else retry) from e
    if not quiet:
        console.note(f"pushed {pushed.files} files to {pushed.url}")


def _hub_progress(*, quiet: bool) -> None:
    if quiet:  # huggingface_hub draws its own bars on stderr
        from huggingface_hub.utils import disable_progress_bars  # type: ignore[attr-defined]

        disable_progress_bars()
