"""`llamapro compare A B` (library twin: `compare_checkpoints`) and the table of a `CompareReport`.

Invariant: a thin command: the figures come from the library; it measures, and only `--max-kl` turns
the mean KL into a verdict (exit 1 above the limit, one `error:` line saying so).
Must not: import torch or transformers itself (the library does, when it runs the models).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from llamapro_cli.cli import console
from llamapro_cli.cli.console import human_bytes
from llamapro_cli.cli.options import CommandSpec, JsonOpt, QuietOpt, choice, integer
from llamapro_cli.verify.compare import CompareEngine
from llamapro_cli.verify.compare_inputs import DEFAULT_MAX_TOKENS
from llamapro_cli.verify.options import Device, DType

if TYPE_CHECKING:
    from llamapro_cli.verify.compare import CompareReport

EXAMPLES = (
    "llamapro compare ./llama2-7b ./pro-8b-trained --text eval.txt",
    "llamapro compare ./llama2-7b ./relayered --prompt 'def fib(n):' --json",
    "llamapro compare ./base ./candidate --text eval.txt --max-kl 0.05  (a CI gate)",
    "llamapro compare ./pro-8b ./pro-8b-pruned --engine native --device cpu --tokens 256",
)
AFTER_EXAMPLES = (
    "Exit codes: 0 measured (it does not judge); 1 mean KL above --max-kl; 2 usage;\n"
    "3 cannot compare (different vocabularies, tokenizers that disagree on the text, no\n"
    "tokenizer for --text/--prompt, an architecture the engine cannot run)."
)


def compare(
    a: Annotated[
        str, typer.Argument(metavar="A", help="The reference checkpoint: a folder or a hub repo id.")
    ],
    b: Annotated[
        str, typer.Argument(metavar="B", help="The checkpoint measured against A (same vocabulary).")
    ],
    text: Annotated[
        str | None,
        typer.Option(
            "--text", metavar="FILE", help="A UTF-8 text file, through A's tokenizer (B's must agree)."
        ),
    ] = None,
    prompt: Annotated[
        str | None, typer.Option(metavar="TEXT", help="This text, through A's tokenizer (B's must agree).")
    ] = None,
    tokens: Annotated[
        int | None,
        integer("--tokens", help="N seeded random token ids (default: verify-identity's default sequence)."),
    ] = None,
    seed: Annotated[int, integer("--seed", help="Seed of the random token ids.")] = 0,
    max_tokens: Annotated[
        int,
        integer("--max-tokens", help="Use at most N tokens of the input (the rest is cut, with a warning)."),
    ] = DEFAULT_MAX_TOKENS,
    engine: Annotated[
        CompareEngine,
        choice(
            CompareEngine,
            "--engine",
            help="auto (transformers when installed), transformers, or native (one block at a time).",
        ),
    ] = CompareEngine.AUTO,
    device: Annotated[
        Device, choice(Device, "--device", help="auto (CUDA when present), cuda, or cpu.")
    ] = Device.AUTO,
    dtype: Annotated[
        DType,
        choice(
            DType,
            "--dtype",
            help="auto (the checkpoints' dtype; float32 when they differ), float32, bfloat16 or float16.",
        ),
    ] = DType.AUTO,
    max_kl: Annotated[
        float | None,
        typer.Option("--max-kl", metavar="X", help="Exit 1 when the mean KL(A‖B) is above X (nats)."),
    ] = None,
    quiet: QuietOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Measure how far apart two checkpoints are on the same tokens.

    Both models run on the same token ids (a text, a prompt, or seeded random ids); their logits give the
    max and mean |Δ logit|, the mean KL(A‖B) of the next-token distributions, top-1 agreement and each
    model's perplexity. Long inputs are cut into chunks of the models' context. It measures: exit 0
    whatever the figures, unless --max-kl is given.
    """
    from llamapro_cli.errors import CheckFailed
    from llamapro_cli.verify.compare import compare_checkpoints

    with console.progress("compare", quiet=quiet or json_) as progress:
        report = compare_checkpoints(
            a,
            b,
            text=text,
            prompt=prompt,
            tokens=tokens,
            seed=seed,
            max_tokens=max_tokens,
            engine=engine,
            device=device,
            dtype=dtype,
            max_kl=max_kl,
            progress=progress,
        )
    if not quiet:
        for warning in report.warnings:
            console.warn(warning)
    if json_:
        console.print_json(report)
    else:
        render_compare(report)
    if report.within_max_kl is False:
        limit = f"--max-kl {report.max_kl:g}"
        if report.mean_kl is None:
            raise CheckFailed(f"mean KL(A‖B) is not finite (Inf or NaN logits), so it is not within {limit}")
        raise CheckFailed(f"mean KL(A‖B) {_number(report.mean_kl)} is above {limit}")


COMMAND = CommandSpec("compare", compare, EXAMPLES, after=AFTER_EXAMPLES)


def render_compare(report: CompareReport) -> None:
    """The two checkpoints, the input, then the figures, one per row."""
    rows = [
        ("A", f"{report.a} ({report.num_layers_a} layers, {report.architecture_a})"),
        ("B", f"{report.b} ({report.num_layers_b} layers, {report.architecture_b})"),
        ("engine", f"{report.engine} on {report.device}, {report.dtype}"),
        ("input", _input(report)),
        ("max |Δ logit|", _number(report.max_abs_logit_diff)),
        ("mean |Δ logit|", _number(report.mean_abs_logit_diff)),
        ("mean KL(A‖B)", _number(report.mean_kl) + (" nats" if report.mean_kl else "")),
        ("top-1 agreement", _agreement(report)),
        (
            "perplexity",
            f"A {_number(report.perplexity_a)}, B {_number(report.perplexity_b)} "
            f"({report.predicted_tokens} next-token predictions)",
        ),
    ]
    if report.max_kl is not None:
        verdict = "within" if report.within_max_kl else "ABOVE"
        rows.append(("--max-kl", f"{report.max_kl:g}: mean KL {verdict}"))
    if report.peak_bytes_loaded is not None:
        rows.append(("weights resident", f"at most {human_bytes(report.peak_bytes_loaded)} at once"))
    memory = f"RSS {human_bytes(report.peak_rss_bytes)}"
    if report.peak_gpu_bytes is not None:
        memory += f", GPU {human_bytes(report.peak_gpu_bytes)}"
    rows += [("time", f"{report.seconds:.1f} s"), ("peak memory", memory)]
    console.print_rows(rows)


def _input(report: CompareReport) -> str:
    if report.input == "text":
        what = f"{report.tokens} tokens of {report.text}"
    elif report.input == "prompt":
        what = f"{report.tokens} prompt tokens"
    else:
        what = f"{report.tokens} random token ids, seed {report.seed}"
    if report.chunks > 1:
        what += f", in {report.chunks} chunks of at most {report.chunk_tokens} (the models' context)"
    return what


def _agreement(report: CompareReport) -> str:
    if report.top1_agreement is None:
        return "-"
    agree = round(report.top1_agreement * report.tokens)
    return f"{100 * report.top1_agreement:.1f}% ({agree} of {report.tokens} positions)"


def _number(value: float | None) -> str:
    """0 exactly as 0; null (not finite) as '-'; else 4 significant digits."""
    return "-" if value is None else ("0" if value == 0 else f"{value:.4g}")
