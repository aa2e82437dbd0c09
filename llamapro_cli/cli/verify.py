"""`llamapro verify-identity` (library twin: `verify_identity`) and the report of an `IdentityReport`.

Invariant: a thin command: the verdict comes from the library; the CLI turns "different" into exit 1.
Must not: import torch or transformers itself (the library does, when the numerical check runs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from llamapro_cli.cli import console
from llamapro_cli.cli.console import human_bytes, layer_ranges
from llamapro_cli.cli.engines_cmds import EnginePythonOpt, serving_rows
from llamapro_cli.cli.options import CommandSpec, JsonOpt, QuietOpt, choice, integer
from llamapro_cli.verify.identity import Device, DType, Engine

if TYPE_CHECKING:
    from llamapro_cli.verify.identity import IdentityReport
    from llamapro_cli.verify.structural import StructuralResult

EXAMPLES = (
    "llamapro verify-identity --out ./pro-8b   (base: llamapro.json)",
    "llamapro verify-identity --out ./pro-8b --engine native --device cpu",
    "llamapro verify-identity --out ./pro-8b --prompt 'def fib(n):' --json",
    "llamapro verify-identity --in ./llama2-7b --out ./merged  (other tools)",
    "llamapro verify-identity --out ./pro-8b --engine llama.cpp  (after: llamapro engines install llama.cpp)",
)
AFTER_EXAMPLES = (
    "Exit codes: 0 identical; 1 different (the first difference is named); 2 usage; 3 cannot\n"
    "check (no base, no consistent layer mapping, no tokenizer, engine or device unavailable,\n"
    "or the serving engine cannot load a model: its reason is quoted)."
)


def verify_identity(
    out: Annotated[
        str,
        typer.Option(
            "--out", metavar="CHECKPOINT", help="The expanded checkpoint: a folder or a hub repo id."
        ),
    ],
    in_: Annotated[
        str | None,
        typer.Option(
            "--in",
            metavar="CHECKPOINT",
            help="The base checkpoint (default: the source recorded in llamapro.json).",
        ),
    ] = None,
    engine: Annotated[
        Engine,
        choice(
            Engine,
            "--engine",
            help="auto (transformers when installed), transformers, native (one block at a time), or a "
            "serving engine in its own environment: vllm, llama.cpp (via GGUF), mlx.",
        ),
    ] = Engine.AUTO,
    device: Annotated[
        Device, choice(Device, "--device", help="auto (CUDA when present), cuda, or cpu.")
    ] = Device.AUTO,
    dtype: Annotated[
        DType,
        choice(DType, "--dtype", help="auto (the checkpoint's dtype), float32, bfloat16 or float16."),
    ] = DType.AUTO,
    tokens: Annotated[
        int | None,
        integer(
            "--tokens", help="Length of the random token sequence (default: 32, or past the sliding window)."
        ),
    ] = None,
    seed: Annotated[int, integer("--seed", help="Seed of the random token ids.")] = 0,
    prompt: Annotated[
        str | None,
        typer.Option(metavar="TEXT", help="Use this text, through the checkpoint's tokenizer, instead."),
    ] = None,
    atol: Annotated[
        float, typer.Option(metavar="X", help="Largest |Δ logit| accepted (default 0: bit-identical).")
    ] = 0.0,
    engine_python: EnginePythonOpt = None,
    quiet: QuietOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Prove the expanded checkpoint computes exactly what its base did.

    First a structural check (no torch, any size): every original tensor byte-identical to the base's,
    every copy identical to its source except the zeroed tensors, which are all zero, and every layer's
    per-layer config (attention type, window) equal to its source's. Then a numerical check on the same
    tokens: a full forward, cached decoding past every sliding window, and greedy decoding, compared
    exactly. Without llamapro.json, --in is required and the layer mapping is inferred from the zeros.
    """
    from llamapro_cli.errors import CheckFailed
    from llamapro_cli.verify.identity import verify_identity as run_verify

    with console.progress("verify-identity", quiet=quiet or json_) as progress:
        report = run_verify(
            out,
            base=in_,
            engine=engine,
            device=device,
            dtype=dtype,
            tokens=tokens,
            seed=seed,
            prompt=prompt,
            atol=atol,
            engine_python=engine_python,
            progress=progress,
        )
    if not quiet:
        for warning in report.warnings:
            console.warn(warning)
    if json_:
        console.print_json(report)
    else:
        render_identity(report)
    if report.verdict != "identical":
        raise CheckFailed(f"not identical: {report.reason}", hint=report.hint)


COMMAND = CommandSpec("verify-identity", verify_identity, EXAMPLES, after=AFTER_EXAMPLES)


def render_identity(report: IdentityReport) -> None:
    """The verdict on one unwrapped, greppable line, then the figures."""
    verdict = "IDENTICAL" if report.verdict == "identical" else f"DIFFERENT: {report.reason}"
    console.print_line(f"verdict: {verdict}")  # plain: greppable, never wrapped
    rows = [
        (
            "expanded",
            f"{report.expanded} ({report.num_layers_out} layers, new {layer_ranges(report.new_layers)})",
        ),
        ("base", f"{report.base} ({report.num_layers_in} layers, {report.architecture})"),
        ("layer mapping", report.mapping),
        ("structure", _structure(report.structural)),
    ]
    if report.engine is None:
        why = (
            "skipped" if report.structural is None or report.structural.ok else "not run (structure differs)"
        )
        rows.append(("numerical check", why))
    else:
        rows += _numbers(report)
    memory = f"RSS {human_bytes(report.peak_rss_bytes)}"
    if report.peak_gpu_bytes is not None:
        memory += f", GPU {human_bytes(report.peak_gpu_bytes)}"
    rows += [("time", f"{report.seconds:.1f} s"), ("peak memory", memory)]
    console.print_rows(rows)


def _structure(result: StructuralResult | None) -> str:
    if result is None:
        return "skipped"
    if not result.ok:
        where = f" (layer {result.layer})" if result.layer is not None else ""
        return f"different at {result.tensor}{where}"
    return (
        f"identical: {result.tensors_checked} tensors, {human_bytes(result.bytes_compared)} compared "
        f"({result.seconds:.1f} s)"
    )


def _numbers(report: IdentityReport) -> list[tuple[str, str]]:
    seed = f", seed {report.seed}" if report.seed is not None else ""
    # "32 random token ids" names its unit; a prompt needs it said: "15 prompt tokens".
    what = "prompt tokens" if report.input == "prompt" else report.input
    rows = [
        ("engine", f"{report.engine} on {report.device}, {report.dtype}"),
        (
            "input",
            f"{report.tokens} {what}{seed}: prefill {report.prefill}, then "
            f"{report.decode_steps} cached one-token steps and {report.decode_steps} greedy tokens",
        ),
        (
            "max |Δ logprob|" if report.serving and report.serving.outputs == "logprobs" else "max |Δ logit|",
            f"full {_delta(report.full_max_abs)}, cached {_delta(report.cached_max_abs)} "
            + ("(exact comparison)" if report.atol == 0 else f"(atol {report.atol:g})"),
        ),
        ("greedy tokens", {True: "equal", False: "differ", None: "-"}[report.greedy_tokens_equal]),
    ]
    if report.divergence:
        where = [
            f"{label} {value}"
            for label, value in (
                ("layer", report.first_divergence_layer),
                ("position", report.first_divergence_position),
            )
            if value is not None
        ]
        rows.append(("first divergence", report.divergence + (f" ({', '.join(where)})" if where else "")))
    if report.peak_bytes_loaded is not None:
        rows.append(("weights resident", f"at most {human_bytes(report.peak_bytes_loaded)} at once"))
    return rows + serving_rows(report.serving)


def _delta(value: float | None) -> str:
    return "-" if value is None else ("0" if value == 0 else f"{value:.3g}")
