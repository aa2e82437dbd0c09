"""The native engine's lockstep driver: a base checkpoint and its expansion run layer by layer side by side.

Each original block's output must equal the base block's, each inserted block's output must equal its
input, so the first difference is named by layer and position (docs/native-engine.md). `run_lockstep`
returns the same `NumericalResult` as the transformers engine; `run_native` adapts it to
`verify_identity`'s inputs. The model itself (blocks, attention, norms) is `model.py`.

Invariant: each pass (the full forward, then each cached decode step) reads every block of both models
once, with one block resident at a time (`model.Meter` counts it).
Must not: print. This module imports torch at import time: import it lazily.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.errors import InputError
from llamapro_cli.plan import ExpansionPlan
from llamapro_cli.verify.model import Meter, Model, as_batch, opened
from llamapro_cli.verify.numerics import Inputs, NumericalResult
from llamapro_cli.verify.spec import KV

Progress = Callable[[int, int], None]  # (blocks run, blocks in all passes)
Divergence = tuple[int, int, str] | None  # (layer, position, what)


def _abs_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Equal values (infinities too) differ by 0; a NaN stays NaN, which no tolerance passes.
    return torch.where(a == b, 0.0, (a.float() - b.float()).abs())


def _check(
    got: torch.Tensor, want: torch.Tensor, atol: float, layer: int, start: int, what: str
) -> Divergence:
    """(layer, first position where |got - want| > atol, what), or None."""
    bad = ~(_abs_diff(got, want) <= atol)
    positions = bad.any(-1).any(0).nonzero()
    return (layer, start + int(positions[0]), what) if len(positions) else None


@dataclass(frozen=True)
class _Pass:
    delta: torch.Tensor  # (tokens,) max |Δ logit| at each position, over batch and vocabulary
    argmax: KV  # (batch, tokens) greedy tokens of base and expanded
    divergence: Divergence


def _lockstep_pass(
    models: tuple[Model, Model],
    plan: ExpansionPlan,
    ids: KV,
    start: int,
    keep: int,
    atol: float,
    tick: Callable[[int], None],
) -> _Pass:
    """New tokens through both models, block by block: every block of both read once, outputs compared."""
    base, exp = models
    length = ids[0].shape[1]
    step_b, step_e = base.step(start, length, keep), exp.step(start, length, keep)
    h_b, h_e = base.embed(ids[0]), exp.embed(ids[1])
    found = _check(h_e, h_b, atol, -1, start, "the embedding differs")
    for layer in plan.layers:
        j, i = layer.index, layer.source
        if layer.identity:
            out = exp.block(j, h_e, step_e)
            what = f"inserted layer {j} (copy of base layer {i}) is not an identity (output != input)"
            found, h_e = found or _check(out, h_e, atol, j, start, what), out
        else:
            h_b, h_e = base.block(i, h_b, step_b), exp.block(j, h_e, step_e)
            found = found or _check(
                h_e, h_b, atol, j, start, f"original layer {j} (base layer {i}) output differs"
            )
        tick(1 if layer.identity else 2)
    # The base's logits stay (tokens x vocab); the expanded head is loaded once the base head is freed.
    ref = torch.cat([chunk for _, chunk in base.logits(h_b)], dim=1)
    delta, argmax = torch.empty(length), torch.empty(ref.shape[:2], dtype=torch.long)
    for t, chunk in exp.logits(h_e):
        if chunk.shape[-1] != ref.shape[-1]:
            raise InputError(f"the vocabularies differ: base {ref.shape[-1]}, expanded {chunk.shape[-1]}")
        span = slice(t, t + chunk.shape[1])
        delta[span] = _abs_diff(chunk, ref[:, span]).amax(dim=(0, 2)).cpu()
        argmax[:, span] = chunk.argmax(-1).cpu()
    if found is None and not bool((delta <= atol).all()):
        first = int((~(delta <= atol)).nonzero()[0])
        found = (len(plan.layers), start + first, "the final norm or lm_head differs (every layer matched)")
    return _Pass(delta, (ref.argmax(-1).cpu(), argmax), found)


@torch.inference_mode()
def run_lockstep(
    base: Checkpoint,
    expanded: Checkpoint,
    plan: ExpansionPlan,
    input_ids: torch.Tensor,
    *,
    device: str,
    dtype: torch.dtype,
    prefill: int,
    decode_steps: int,
    atol: float = 0.0,
    progress: Progress | None = None,
) -> NumericalResult:
    """Run base and expanded side by side with one block resident at a time (docs/native-engine.md).

    Full pass: every position of `input_ids`, caching each layer's K/V for the first `prefill` positions.
    Cached pass: the prefill's logits, then up to `decode_steps` one-token greedy steps, each model feeding
    its own argmax through its own cache; logits are compared while both were fed the same tokens, so
    decoding stops at the first differing token. Each step re-reads every block of both models.
    In the result, layer -1 is the embedding and layer L (the expanded layer count) the final norm / head;
    a divergence seen only in cached decoding is at position prefill + step.
    """
    ids = as_batch(input_ids)
    if plan.num_layers_in != base.num_layers or plan.num_layers_out != expanded.num_layers:
        raise InputError(
            f"the layer mapping ({plan.num_layers_in} -> {plan.num_layers_out} layers) does not fit the "
            f"checkpoints ({base.num_layers} -> {expanded.num_layers} layers)"
        )
    if not 1 <= prefill <= ids.shape[1]:
        raise InputError(f"prefill must be between 1 and the {ids.shape[1]} prompt tokens, got {prefill}")
    total, done = (plan.num_layers_out + plan.num_layers_in) * (1 + max(0, decode_steps)), [0]

    def tick(blocks: int) -> None:
        done[0] += blocks
        if progress is not None:
            progress(done[0], total)

    meter = Meter()
    with opened(base, device, dtype, meter) as mb, opened(expanded, device, dtype, meter) as me:
        full = _lockstep_pass((mb, me), plan, (ids, ids), 0, prefill, atol, tick)
        cached, found = [full.delta[:prefill]], full.divergence
        tokens = (full.argmax[0][:, prefill - 1 : prefill], full.argmax[1][:, prefill - 1 : prefill])
        for s in range(decode_steps):
            if not torch.equal(*tokens):
                break
            step = _lockstep_pass((mb, me), plan, tokens, prefill + s, prefill + s + 1, atol, tick)
            cached.append(step.delta)
            if found is None and step.divergence is not None:
                found = (*step.divergence[:2], f"{step.divergence[2]} in cached decoding step {s}")
            tokens = step.argmax
    return NumericalResult(
        full_max_abs=float(full.delta.max()),
        cached_max_abs=float(torch.cat(cached).max()),
        tokens_equal=torch.equal(*tokens),
        layer=found[0] if found else None,
        position=found[1] if found else None,
        divergence=found[2] if found else None,
        peak_bytes_loaded=meter.peak,
        bytes_loaded=meter.total,
    )


def run_native(
    base: Checkpoint,
    expanded: Checkpoint,
    plan: ExpansionPlan,
    inputs: Inputs,
    device: str,
    dtype: torch.dtype,
    atol: float,
    progress: Progress | None = None,
) -> NumericalResult:
    """The native engine on `verify_identity`'s inputs."""
    return run_lockstep(
        base,
        expanded,
        plan,
        inputs.ids,
        device=device,
        dtype=dtype,
        prefill=inputs.prefill,
        decode_steps=inputs.decode_steps,
        atol=atol,
        progress=progress,
    )
