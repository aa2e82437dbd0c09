"""A layer map's output runs its source layers, each as its source ran: llamapro relayer against mergekit.

Protects the claim of docs/performance.md (and issue 17) that `llamapro relayer` carries every layer's
attention pattern over to the output, while mergekit's `passthrough` sets the layer count alone: on a
Qwen2 or Gemma 2 config, whose layers alternate between sliding-window and full attention, the same
slices give a model that runs different layers with a different attention, though its weights are the
same bytes.

The reference is built by hand from the source model's own modules: its embedding, its decoder layers
in map order (layer j is source layer s, called with the attention mask of s's kind: the kind is what
makes a layer sliding, and each layer keeps its own module), its final norm and head. A self-check
asserts that, with the identity map, this reproduces the source model's forward bit for bit. Sequences
are 16 tokens, four times the tiny models' window, so every window is active.

mergekit runs as a subprocess from its own virtual environment (`bench/.work/mergekit-venv`, created by
`make test-peers` through `bench/peers.py`, with torch pinned); without it these tests are skipped. With
transformers 5, whose config classes refuse a `layer_types` list of the wrong length, mergekit exits
non-zero after writing the weights and before writing config.json; its output is then completed with the
config edit its code makes (the layer count alone, as its llama output shows), on a hub-style config
without `layer_types`, which is how Qwen2.5 and Gemma 2 configs on the hub are written.

Must not: import mergekit into this process, or run in `make test` without that venv.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO / "bench"))  # appended: its module names must not shadow others

import layermaps  # noqa: E402  (bench/ is not a package)
import peers  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
import tiny_models  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from llamapro_cli.relayer import relayer  # noqa: E402

MERGEKIT = peers.mergekit_venv(REPO / "bench" / ".work") / "bin" / "mergekit-yaml"
pytestmark = pytest.mark.skipif(
    not MERGEKIT.exists(), reason=f"no mergekit venv at {MERGEKIT.parents[1]}: `make test-peers` creates it"
)
SEQ_LEN = 16  # > tiny_models.WINDOW (4): the sliding masks cut


@dataclass(frozen=True)
class Case:
    family: str
    variant: str
    spec: str
    mergekit_right: bool  # whether mergekit's count-only config gives every layer its source's attention


CASES = {
    # Layers 0-2 full, 3-5 sliding (max_window_layers 3): output layer 4 is layer 2 (full), but
    # max_window_layers makes every layer from 3 on sliding.
    "qwen2-dus": Case("qwen2", "sliding_legacy", "0-3,2-5", mergekit_right=False),
    # Sliding on even layers: repeating layer 3 shifts the alternation of every layer after the copy.
    "gemma2-repeat": Case("gemma2", "legacy", "0-3,3-5", mergekit_right=False),
    # An overlap of two layers keeps every layer's parity: the alternation mergekit leaves is right by luck.
    "gemma2-dus-even": Case("gemma2", "legacy", "0-3,2-5", mergekit_right=True),
    # No per-layer fields: any map is right in both tools.
    "llama-dus": Case("llama", "default", "0-3,2-5", mergekit_right=True),
}


@dataclass(frozen=True)
class Outputs:
    source: Path
    llamapro: Path
    mergekit: Path
    mergekit_log: str  # mergekit's own output when it did not write config.json, else ""


def _run_mergekit(src: Path, spec: str, out: Path) -> str:
    """mergekit's passthrough with one slice per range; '' when it wrote a config, else its output."""
    config = out.parent / f"{out.name}.yml"
    config.write_text(layermaps.mergekit_slices(src, spec, "float32"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # its venv, not this worktree
    done = subprocess.run(
        [str(MERGEKIT), str(config), str(out)],
        capture_output=True,
        text=True,
        env={**env, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    if (out / "config.json").is_file():
        assert done.returncode == 0, done.stdout + done.stderr
        return ""
    log = done.stdout + done.stderr
    # Only the known refusal is completed below; any other failure is a failure of this test.
    assert done.returncode != 0 and "layer_types" in log, log[-2000:]
    (out / "config.json").write_text(json.dumps(layermaps.count_only_config(src, len(spec_map(spec)))))
    return log


def spec_map(spec: str) -> list[int]:
    return layermaps.spec_sources(spec)


@pytest.fixture(scope="module")
def outputs(
    tiny_model: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Outputs]:
    cache: dict[str, Outputs] = {}

    def make(name: str) -> Outputs:
        if name not in cache:
            case = CASES[name]
            src = tiny_model(case.family, case.variant)
            work = tmp_path_factory.mktemp(name)
            relayer(src, work / "llamapro", layers=case.spec)
            log = _run_mergekit(src, case.spec, work / "mergekit")
            cache[name] = Outputs(src, work / "llamapro", work / "mergekit", log)
        return cache[name]

    return make


def _ids(src: Path) -> Any:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, int(tiny_models.read_config(src)["vocab_size"]), (2, SEQ_LEN), generator=gen)


@torch.no_grad()
def run_by_hand(model: Any, ids: Any, sources: list[int]) -> Any:
    """Logits of `model`'s own modules with its decoder layers called in the order `sources`, each with
    the attention mask of its own kind (the masks are built as the model's forward builds them)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    inner, config = model.model, model.config
    hidden = inner.embed_tokens(ids)  # Gemma 2's scaled embedding scales inside the module
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    mask_kw = {
        "config": config,
        "inputs_embeds": hidden,
        "attention_mask": None,
        "cache": None,
        "position_ids": positions,
    }
    masks = {"full_attention": create_causal_mask(**mask_kw)}
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    if "sliding_attention" in kinds:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kw)
    rotary = inner.rotary_emb(hidden, positions)
    for s in sources:
        hidden = inner.layers[s](
            hidden, attention_mask=masks[kinds[s]], position_embeddings=rotary, position_ids=positions
        )
    logits = model.lm_head(inner.norm(hidden))
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:  # as Gemma2ForCausalLM.forward: divide, tanh, multiply
        logits = torch.tanh(logits / cap) * cap
    return logits


def _reference(src: Path, ids: Any, sources: list[int]) -> Any:
    model = tiny_models.load_model(src)
    try:
        return run_by_hand(model, ids, sources)
    finally:
        del model


def _logits(path: Path, ids: Any) -> Any:
    model = tiny_models.load_model(path)  # strict: no missing, unexpected or mismatched key
    try:
        return tiny_models.logits_full(model, ids)
    finally:
        del model


def _delta(a: Any, b: Any) -> float:
    return float((a.double() - b.double()).abs().max())


@pytest.mark.parametrize("family,variant", [("qwen2", "sliding_legacy"), ("gemma2", "legacy")])
def test_hand_reference_reproduces_the_model_with_the_identity_map(
    tiny_model: Callable[..., Path], family: str, variant: str
) -> None:
    src = tiny_model(family, variant)
    ids = _ids(src)
    model = tiny_models.load_model(src)
    n = tiny_models.num_layers(src)
    assert torch.equal(run_by_hand(model, ids, list(range(n))), tiny_models.logits_full(model, ids))
    # and it is sensitive to the order: the layers reversed give other logits
    assert not torch.equal(run_by_hand(model, ids, list(range(n))[::-1]), tiny_models.logits_full(model, ids))


@pytest.mark.parametrize("name", CASES)
def test_relayer_output_equals_the_source_layers_run_by_hand(
    outputs: Callable[[str], Outputs], name: str
) -> None:
    out, sources = outputs(name), spec_map(CASES[name].spec)
    assert layermaps.layer_config_mismatches(out.source, out.llamapro, sources) == []
    ids = _ids(out.source)
    reference, got = _reference(out.source, ids, sources), _logits(out.llamapro, ids)
    assert torch.equal(got, reference), f"max |Δ logit| {_delta(got, reference):.3g}"


@pytest.mark.parametrize("name", CASES)
def test_mergekit_writes_the_same_weights(outputs: Callable[[str], Outputs], name: str) -> None:
    """So any difference in its logits comes from its config alone."""
    out = outputs(name)
    ours, theirs = load_file(out.llamapro / "model.safetensors"), {}
    for shard in sorted(out.mergekit.glob("*.safetensors")):
        theirs.update(load_file(shard))
    assert sorted(theirs) == sorted(ours)
    assert [n for n in ours if not torch.equal(ours[n], theirs[n])] == []


@pytest.mark.parametrize("name", CASES)
def test_mergekit_equals_the_source_layers_only_where_its_per_layer_config_is_right(
    outputs: Callable[[str], Outputs], name: str
) -> None:
    case, out = CASES[name], outputs(name)
    sources = spec_map(case.spec)
    wrong = layermaps.layer_config_mismatches(out.source, out.mergekit, sources)
    assert (wrong == []) == case.mergekit_right, wrong
    ids = _ids(out.source)
    reference, got = _reference(out.source, ids, sources), _logits(out.mergekit, ids)
    same = torch.equal(got, reference)
    detail = f"max |Δ logit| {_delta(got, reference):.3g}; layers whose attention differs: {wrong}"
    assert same == case.mergekit_right, detail
    if not same:
        assert _delta(got, reference) > 1e-3, detail  # a real change of the model, not rounding


def test_mergekit_refuses_to_write_a_config_for_a_layer_count_change_on_per_layer_configs(
    outputs: Callable[[str], Outputs],
) -> None:
    """What a mergekit user sees today on Qwen2 and Gemma 2 (documented in docs/performance.md): it exits
    non-zero after the weights, and the folder has no config.json. If a future mergekit writes one, this
    test says the page is out of date (the tests above then check the config it wrote)."""
    logs = {name: outputs(name).mergekit_log for name in ("qwen2-dus", "gemma2-repeat")}
    assert all("must be equal to the number of `layer_types`" in log for log in logs.values()), {
        k: v[-500:] for k, v in logs.items()
    }
    assert outputs("llama-dus").mergekit_log == ""  # llama has no layer_types: mergekit writes its config
