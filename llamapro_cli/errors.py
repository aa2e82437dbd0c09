"""Errors users see: one class per exit code, each carrying a one-line message and an optional hint.

Invariant: every failure the CLI reports on purpose is a `LlamaproError`; the CLI prints
`error: <message>` (+ `hint: <hint>`) and exits with `exit_code`. Anything else is a bug (exit 101).
Messages name the file or tensor at fault and fit on one line.
"""

from __future__ import annotations


class LlamaproError(Exception):
    """Base class; `exit_code` is the process exit status the CLI uses."""

    exit_code: int = 101

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        # One line, always: a newline in a message would break the `error:` contract.
        self.message = " ".join(message.split())
        self.hint = " ".join(hint.split()) if hint else None
        super().__init__(self.message)


class CheckFailed(LlamaproError):
    """The check ran and failed (logits differ, a frozen tensor changed)."""

    exit_code = 1


class UsageError(LlamaproError):
    """Bad options, including a plan that does not fit the checkpoint or a format that cannot express it."""

    exit_code = 2


class InputError(LlamaproError):
    """Bad or unsupported input: corrupt shard, index mismatch, refused quantization, unknown architecture."""

    exit_code = 3


class UnsupportedError(InputError):
    """A well-formed input this tool refuses (unknown or unsupported architecture, refused quantization)."""


class OutputError(LlamaproError):
    """The output cannot be written: exists without --force, disk full, permission denied."""

    exit_code = 4


class Interrupted(LlamaproError):
    """SIGINT (130) or SIGTERM (143) arrived; the partial output has been removed."""

    def __init__(self, signum: int) -> None:
        import signal

        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name}")
        self.exit_code = 128 + signum
