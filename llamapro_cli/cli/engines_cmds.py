"""`llamapro engines install ENGINE`, `llamapro gguf-pattern`, and the `--engine-python` option.

Library twins: `verify.engines.install.install_engine`, `verify.engines.gguf.write_gguf_pattern`.
Invariant: thin commands; the interpreter path (data) goes to stdout, progress lines to stderr.
Must not: import an engine, torch or transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from llamapro_cli.cli import console
from llamapro_cli.cli.options import Command, CommandSpec, JsonOpt, QuietOpt
from llamapro_cli.verify.engines.spec import RECIPES, ServingEngine

if TYPE_CHECKING:
    from llamapro_cli.verify.engines.result import ServingReport

EnginePythonOpt = Annotated[
    str | None,
    typer.Option(
        "--engine-python",
        metavar="PATH",
        help="Interpreter of a vllm/llama.cpp/mlx --engine (default: the environment `llamapro engines "
        "install ENGINE` created).",
    ),
]

INSTALL_EXAMPLES = (
    "llamapro engines install mlx",
    "llamapro engines install llama.cpp   (builds llama-cpp-python from source: ~10 min)",
    "XDG_CACHE_HOME=/big/disk llamapro engines install vllm",
)
INSTALL_AFTER = (
    "Pins: "
    + "; ".join(f"{engine.value}: {recipe.about}" for engine, recipe in RECIPES.items())
    + ".\n\nExit codes: 0 installed (or already there); 2 usage; 4 the environment could not be created "
    "(the pip output is in its install.log)."
)


def install(
    engine: Annotated[
        ServingEngine,
        typer.Argument(
            metavar="ENGINE",
            help="vllm, llama.cpp or mlx.",
            parser=lambda value: _engine(value),
        ),
    ],
    force: Annotated[
        bool, typer.Option("--force", help="Delete and rebuild an existing environment.")
    ] = False,
    python: Annotated[
        str | None,
        typer.Option("--python", metavar="PATH", help="Base interpreter of the new environment (3.10+)."),
    ] = None,
    quiet: QuietOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Create ENGINE's own Python environment under the user's cache, with the measured pins.

    The environment lives in $XDG_CACHE_HOME/llamapro/engines/ENGINE (default ~/.cache/...), apart from
    llamapro's: its dependency pins (vLLM's torch, llama.cpp's build) never touch yours. llama.cpp keeps
    the converter (convert_hf_to_gguf.py) and gguf-py of the very source it was built from.
    """
    from llamapro_cli.verify.engines.install import install_engine

    def log(line: str) -> None:
        if not (quiet or json_):
            console.note(f"{engine.value}: {line}")

    done = install_engine(engine, force=force, base_python=python, log=log)
    versions = ", ".join(f"{k} {v}" for k, v in done.versions.items())
    if not (quiet or json_):
        state = "already installed" if done.already else f"installed in {done.seconds:.0f} s"
        console.note(f"{engine.value} {state}: {versions}")
    if json_:
        console.print_json(done)
    else:
        console.print_line(done.python)


def _engine(value: str | ServingEngine) -> ServingEngine:
    from llamapro_cli.verify.options import choice as parse_choice

    parsed: ServingEngine = parse_choice(ServingEngine, str(value).strip().lower(), "ENGINE")
    return parsed


INSTALL = CommandSpec("install", install, INSTALL_EXAMPLES, after=INSTALL_AFTER)


def register(app: typer.Typer, wrap: Callable[[Callable[..., None]], Any]) -> None:
    """Add the `engines` group to `app`, each command wrapped by `wrap` (the app's error mapping)."""
    group = typer.Typer(
        name="engines",
        help="Environments of the serving engines verify-identity runs in (vllm, llama.cpp, mlx).",
        no_args_is_help=True,
        rich_markup_mode=None,
    )
    group.command(INSTALL.name, cls=Command, epilog=INSTALL.epilog())(wrap(INSTALL.run))
    app.add_typer(group, name="engines")


GGUF_EXAMPLES = (
    "llamapro gguf-pattern ./gemma2-pro gemma2-pro-f32.gguf gemma2-pro-fixed.gguf",
    "llamapro gguf-pattern ./gemma2-pro in.gguf fixed.gguf --json   (verify-identity --engine llama.cpp "
    "checks the same fix)",
)
GGUF_AFTER = (
    "Exit codes: 0 written (or nothing to fix: the GGUF is copied unchanged and a note says so); 2 usage;\n"
    "3 EXPANDED or GGUF_IN unreadable, or no llama.cpp environment; 4 GGUF_OUT exists or cannot be written."
)


def gguf_pattern(
    expanded: Annotated[str, typer.Argument(metavar="EXPANDED", help="The expanded checkpoint folder.")],
    gguf_in: Annotated[Path, typer.Argument(metavar="GGUF_IN", help="Its GGUF, as a converter wrote it.")],
    gguf_out: Annotated[Path, typer.Argument(metavar="GGUF_OUT", help="The GGUF to write (must not exist).")],
    engine_python: EnginePythonOpt = None,
    quiet: QuietOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Write the per-layer sliding-window pattern of EXPANDED into a copy of its GGUF.

    llama.cpp derives which layers slide from the layer index (Gemma 2: every other layer) unless the GGUF
    carries the array ARCH.attention.sliding_window_pattern, which the converter does not write for
    Gemma 2 and Gemma 3. An expansion breaks the index pattern, so llama.cpp would run a different model;
    this writes the array from EXPANDED's config.json (layer_types) with the gguf writer of the llama.cpp
    source the engine was built from. Tensors are copied unchanged.
    """
    from llamapro_cli.checkpoint import Checkpoint
    from llamapro_cli.verify.engines.gguf import write_gguf_pattern

    result = write_gguf_pattern(Checkpoint.open(expanded), gguf_in, gguf_out, python=engine_python)
    if not (quiet or json_):
        for line in result.notes:
            console.note(line)
    if json_:
        console.print_json(result)
    else:
        console.print_line(str(gguf_out))


GGUF_PATTERN = CommandSpec("gguf-pattern", gguf_pattern, GGUF_EXAMPLES, after=GGUF_AFTER)


def serving_rows(serving: ServingReport | None) -> list[tuple[str, str]]:
    """verify-identity's rows about a serving engine (none for transformers/native)."""
    if serving is None:
        return []
    versions = ", ".join(f"{k} {v}" for k, v in serving.versions.items())
    rows = [
        ("engine version", f"{versions} ({serving.python})"),
        ("model format", f"{serving.model_format}; outputs: {serving.outputs}"),
        ("vs transformers", serving.transformers_note),
    ]
    if serving.pattern_fix_note is not None:
        rows.append(("sliding pattern", serving.pattern_fix_note))
    if serving.known_difference is not None:
        rows.append(("known difference", serving.known_difference))
    return rows
