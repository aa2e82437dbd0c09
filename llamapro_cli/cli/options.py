"""Options shared by several commands, the help layout, and the examples-to-epilog rule.

One definition per option spelling: its placeholder (`CHECKPOINT`, `DIR`, `N`, never a Python type)
and its help text. Closed choices are the library's own `Enum`s (`choice()`), declared where they are
used: `--help` lists their values, and the command gets the member, which goes to the library as is.
Examples are data: each command module keeps its `EXAMPLES` beside the command and declares a
`CommandSpec`, whose `epilog()` is the help's epilog (as huggingface_hub's `hf` CLI keeps `*_EXAMPLES`).

Must not: import torch, transformers or huggingface_hub (this module loads for `llamapro --help`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperArgument, TyperCommand

from llamapro_cli.errors import UsageError
from llamapro_cli.plan import parse_int

E = TypeVar("E", bound=StrEnum)

JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one JSON document on stdout instead of a table.")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress and no notes on stderr.")]
RevisionOpt = Annotated[
    str | None,
    typer.Option(
        "--revision",
        metavar="REV",
        help="Hub revision (branch, tag or commit) when CHECKPOINT is a repo id.",
    ),
]
PrivateOpt = Annotated[
    bool, typer.Option("--private", help="Create the hub repo private (an existing repo keeps its setting).")
]
CheckpointArg = Annotated[
    str,
    typer.Argument(metavar="CHECKPOINT", help="A checkpoint folder or a hub repo id (org/name)."),
]


def choice(enum: type[E], option: str, *aliases: str, help: str) -> Any:
    """A closed choice, typed as the library's `Enum`: listed in `--help`, completed by the shell, and
    case-insensitive. A value outside it is our one-line usage error naming the choices (exit 2), not
    the parser's usage screen, like every other bad option value."""
    values = [member.value for member in enum]

    def parse(value: str | E) -> E:
        if isinstance(value, enum):
            return value
        try:
            return enum(str(value).strip().lower())
        except ValueError:
            raise UsageError(f"{option} {value!r} is not one of {', '.join(values)}") from None

    return typer.Option(
        option,
        *aliases,
        parser=parse,
        metavar="[" + "|".join(values) + "]",
        autocompletion=lambda: values,
        help=help,
    )


def integer(option: str, *, metavar: str = "N", help: str) -> Any:
    """An integer option read by `plan.parse_int`, the one bounded parser of numbers in option text: at
    most 18 ASCII digits, so 5000 digits are a one-line usage error (exit 2), never an overflow deeper
    in. Ranges are checked where the meaning is (the plan, the verifier), with messages that say why."""

    def parse(value: str | int) -> int:
        if isinstance(value, int):
            return value
        return parse_int(value, option=option, what="an integer", hint=f"e.g. {option} 4")

    return typer.Option(option, parser=parse, metavar=metavar, help=help)


def roles(text: str) -> tuple[str, ...]:
    """`--also embeddings,head` -> ('embeddings', 'head'); the library names a bad role."""
    return tuple(text.split(",")) if text else ()


@dataclass(frozen=True)
class CommandSpec:
    """One command as its module declares it: name, function, examples and the epilog's other text."""

    name: str
    run: Callable[..., None]
    examples: tuple[str, ...]
    before: str = ""  # epilog text above the examples
    after: str = ""  # epilog text below them (exit codes, notes)

    def epilog(self) -> str:
        """The help's epilog: `before`, the examples (one paragraph each), `after`."""
        title = "Examples:" if len(self.examples) > 1 else "Example:"
        body = title + "\n\n" + "\n\n".join(f"  {example}" for example in self.examples)
        return "\n\n".join(part for part in (self.before, body, self.after) if part)


class _PlainArgument(TyperArgument):
    """A positional argument shown by its placeholder alone: `CHECKPOINT`, not `{CHECKPOINT}` and
    `CHECKPOINT <str>` (Typer 0.29's own display), the way git and hf write them."""

    def get_usage_pieces(self, ctx: Any) -> list[str]:
        return [self.display_name_raw + ("..." if self.nargs != 1 else "")]

    def display_type_rich(self, ctx: Any) -> str | None:
        return None


class Command(TyperCommand):
    """Every llamapro command: Typer's command with plain argument placeholders."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if type(param) is TyperArgument:
                param.__class__ = _PlainArgument
