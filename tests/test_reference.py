"""The native engine (`verify/model.py`, `verify/lockstep.py`): transformers' logits, lockstep verdicts,
and its memory bound.

transformers is the oracle (`hf` tests): the native forward must match it in fp32 on every family/variant
of tiny_models.FAMILIES and on each rope-scaling type, full forward and cached decoding, with sequences
longer than the sliding window. Lockstep runs on real expansions (`expand`) must report exact zeros; edits
made with the safetensors library must be located to the layer and position. Memory is checked by counting
the bytes of weights resident, not by timing.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from llamapro_cli.checkpoint import Checkpoint
from llamapro_cli.demo import write_demo_checkpoint
from llamapro_cli.errors import InputError, UnsupportedError
from llamapro_cli.expand import expand
from llamapro_cli.plan import ExpansionPlan, plan_expansion
from llamapro_cli.verify.lockstep import run_lockstep
from llamapro_cli.verify.model import cached_logits, forward_logits
from llamapro_cli.verify.numerics import NumericalResult
from llamapro_cli.verify.spec import MODELING, read_spec

try:  # the oracle needs transformers; without it only the non-hf tests are collected with cases
    import tiny_models

    VARIANTS = [(fam, var) for fam, var in tiny_models.all_variants() if fam in MODELING]
except ImportError:  # pragma: no cover - transformers is a dev dependency
    VARIANTS = []

SEQ, PREFILL, STEPS = 16, 8, 4  # 16 tokens > the tiny models' sliding window of 4
# Where the native engine is not bit-identical to transformers, and by how much at most. Only cached decoding
# past a sliding window in fp32: transformers' sliding cache drops the keys this engine masks, so the
# attention sums run in another order. Measured on every variant (tiny models, 16 tokens, window 4):
# mistral 4.8e-7, qwen2 sliding(_legacy) 7.2e-7, qwen3 sliding(_legacy) 3.3e-7; every full forward, every
# cached pass without a window and every bf16 pass is bit-identical.
SLIDING_CACHE_BOUND = 1e-6


def _sliding(family: str, variant: str) -> bool:
    return family == "mistral" or variant.startswith("sliding")


def _assert_equal(got: torch.Tensor, want: torch.Tensor, bound: float = 0.0) -> None:
    """Bit-identical, or (where a bound is measured) no element further apart than it."""
    assert got.shape == want.shape and got.dtype == want.dtype
    if bound == 0.0:
        assert torch.equal(got, want), f"max |Δ| {(got.double() - want.double()).abs().max().item():.3g}"
    else:
        assert (got.double() - want.double()).abs().max().item() <= bound


def _ids(vocab: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def _expand(src: Path, out: Path, **options: Any) -> tuple[Checkpoint, Checkpoint, ExpansionPlan]:
    expand(src, out, **options)
    base, exp = Checkpoint.open(src), Checkpoint.open(out)
    keys = ("every", "after")
    plan = plan_expansion(base.num_layers, **{k: v for k, v in options.items() if k in keys})
    return base, exp, plan


def _lockstep(base: Checkpoint, exp: Checkpoint, plan: ExpansionPlan, **kw: Any) -> NumericalResult:
    vocab = base.info("model.embed_tokens.weight").shape[0]
    options: dict[str, Any] = {
        "device": "cpu",
        "dtype": torch.float32,
        "prefill": PREFILL,
        "decode_steps": STEPS,
    }
    return run_lockstep(base, exp, plan, _ids(vocab), **{**options, **kw})


def _assert_identical(result: NumericalResult) -> None:
    assert result.full_max_abs == 0.0 and result.cached_max_abs == 0.0, result
    assert result.tokens_equal and result.layer is None and result.divergence is None, result


def _edit_tensor(folder: Path, name: str, edit: Callable[[torch.Tensor], None]) -> None:
    """Change one tensor in place with the safetensors library (the shard is rewritten whole)."""
    index = folder / "model.safetensors.index.json"
    shard = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
    tensors = load_file(folder / shard)
    edit(tensors[name])
    save_file(tensors, folder / shard, metadata={"format": "pt"})


def _edit_config(folder: Path, **changes: Any) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


# --- the forward pass against transformers -----------------------------------------------------------


def _transformers_logits(folder: Path, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import tiny_models

    # A fresh model for each: dynamic RoPE keeps state in the module between calls.
    full = tiny_models.logits_full(tiny_models.load_model(folder), ids)
    cached = tiny_models.logits_cached(tiny_models.load_model(folder), ids, PREFILL)
    return full, cached


@pytest.mark.hf
@pytest.mark.parametrize(("family", "variant"), VARIANTS)
def test_logits_match_transformers(tiny_model: Callable[..., Path], family: str, variant: str) -> None:
    folder = tiny_model(family, variant)
    ids = _ids(128)
    want_full, want_cached = _transformers_logits(folder, ids)
    ckpt = Checkpoint.open(folder)
    _assert_equal(forward_logits(ckpt, ids, "cpu", torch.float32), want_full)
    bound = SLIDING_CACHE_BOUND if _sliding(family, variant) else 0.0
    _assert_equal(cached_logits(ckpt, ids, PREFILL, "cpu", torch.float32), want_cached, bound)


@pytest.mark.hf
@pytest.mark.parametrize("family", ["gemma", "mixtral", "phi3"])
def test_other_families_are_refused(tiny_model: Callable[..., Path], family: str) -> None:
    # Llama-shaped blocks with other numerics ((1 + w) norms, experts, fused projections) must not run here.
    with pytest.raises(UnsupportedError, match=f"model_type '{family}'") as info:
        forward_logits(Checkpoint.open(tiny_model(family)), _ids(128))
    assert "--engine transformers" in (info.value.hint or "")


ROPE_CONFIGS: dict[str, dict[str, Any]] = {
    "linear": {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}},
    # max_position_embeddings below the sequence, so the dynamic base grows within the test
    "dynamic": {
        "rope_parameters": {"rope_type": "dynamic", "factor": 3.0, "rope_theta": 10000.0},
        "max_position_embeddings": 10,
    },
    "llama3": {
        "rope_parameters": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
            "rope_theta": 500000.0,
        }
    },
    "yarn": {
        "rope_parameters": {
            "rope_type": "yarn",
            "factor": 4.0,
            "mscale": 1.0,
            "mscale_all_dim": 0.5,
            "beta_fast": 16,
            "truncate": False,
            "rope_theta": 10000.0,
        },
        "original_max_position_embeddings": 64,  # top-level wins over the rope dict, as in transformers
    },
    # configs written before transformers 5: rope_scaling with "type", rope_theta at the top level
    "legacy_scaling": {
        "rope_parameters": None,
        "rope_scaling": {"type": "linear", "factor": 4.0},
        "rope_theta": 2e4,
    },
    "legacy_theta": {"rope_parameters": None, "rope_theta": 20000.0},
}


@pytest.mark.hf
@pytest.mark.parametrize("kind", sorted(ROPE_CONFIGS))
def test_rope_scaling_matches_transformers(
    tiny_model: Callable[..., Path], tmp_path: Path, kind: str
) -> None:
    folder = tmp_path / kind
    shutil.copytree(tiny_model("llama"), folder)
    _edit_config(folder, **ROPE_CONFIGS[kind])
    ids = _ids(128)
    want_full, want_cached = _transformers_logits(folder, ids)
    ckpt = Checkpoint.open(folder)
    _assert_equal(forward_logits(ckpt, ids), want_full)
    _assert_equal(cached_logits(ckpt, ids, PREFILL), want_cached)
    plain = forward_logits(Checkpoint.open(tiny_model("llama")), ids)
    assert not torch.allclose(plain, want_full), "the rope setting had no effect: the test proves nothing"


@pytest.mark.hf
@pytest.mark.parametrize(("family", "variant"), VARIANTS)
def test_bf16_matches_transformers(tiny_model: Callable[..., Path], family: str, variant: str) -> None:
    import tiny_models

    folder = tiny_model(family, variant, dtype="bfloat16")
    ids = _ids(128)
    want_full = tiny_models.logits_full(tiny_models.load_model(folder, dtype=torch.bfloat16), ids)
    model = tiny_models.load_model(folder, dtype=torch.bfloat16)
    want_cached = tiny_models.logits_cached(model, ids, PREFILL)
    ckpt = Checkpoint.open(folder)
    _assert_equal(forward_logits(ckpt, ids, "cpu", torch.bfloat16), want_full)
    _assert_equal(cached_logits(ckpt, ids, PREFILL, "cpu", torch.bfloat16), want_cached)


# --- lockstep on real expansions ---------------------------------------------------------------------

EXPANSIONS = [
    ("llama", "default", {"every": 2}),
    ("llama", "bias", {"after": (0, 5)}),
    ("llama", "tied", {"every": 3}),
    ("mistral", "default", {"after": (1, 4)}),
    ("qwen2", "sliding", {"after": (1, 2, 4)}),  # copies on both sides of max_window_layers = 3
    ("qwen3", "sliding_legacy", {"every": 2}),
    ("internlm3", "qkv_bias", {"after": (3,)}),
]


@pytest.mark.hf
@pytest.mark.parametrize(("family", "variant", "options"), EXPANSIONS)
def test_lockstep_exact_on_expansions(
    tiny_model: Callable[..., Path], tmp_path: Path, family: str, variant: str, options: dict[str, Any]
) -> None:
    base, exp, plan = _expand(tiny_model(family, variant), tmp_path / "out", **options)
    _assert_identical(_lockstep(base, exp, plan))


@pytest.mark.hf
def test_lockstep_sharded_both_sides(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    base, exp, plan = _expand(
        tiny_model("llama", "sharded"), tmp_path / "out", every=2, max_shard_size="200KB"
    )
    assert base.sharded and exp.sharded and len(exp.headers) > 2
    _assert_identical(_lockstep(base, exp, plan))


Pair = tuple[Path, Path]  # (base folder, expanded folder): treat both as read-only


@pytest.fixture(scope="module")
def qwen_pair(tiny_model: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Pair:
    base = tiny_model("qwen2", "sliding")  # layers 3-5 slide (max_window_layers 3), window 4
    out = tmp_path_factory.mktemp("qwen_pair") / "out"
    expand(base, out, after=(1, 4))  # 0 1 1c 2 3 4 4c 5
    return base, out


def _copy(pair: Pair, folder: Path) -> tuple[Checkpoint, Path, ExpansionPlan]:
    """A copy of the expansion to edit, the base checkpoint, and the plan."""
    shutil.copytree(pair[1], folder)
    base = Checkpoint.open(pair[0])
    return base, folder, plan_expansion(base.num_layers, after=(1, 4))


@pytest.mark.hf
def test_lockstep_names_an_altered_original_layer(qwen_pair: Pair, tmp_path: Path) -> None:
    base, folder, plan = _copy(qwen_pair, tmp_path / "edited")
    j = plan.original_to_new[3]  # original layer 3 sits at expanded index 4 (after the copy of layer 1)

    def nudge(t: torch.Tensor) -> None:
        t[0, 0] += 0.25

    _edit_tensor(folder, f"model.layers.{j}.mlp.up_proj.weight", nudge)
    result = _lockstep(base, Checkpoint.open(folder), plan)
    assert (result.layer, result.position) == (j, 0)  # the MLP sees every position
    assert result.divergence == f"original layer {j} (base layer 3) output differs"
    assert result.full_max_abs > 0 and result.cached_max_abs > 0
    relaxed = _lockstep(base, Checkpoint.open(folder), plan, atol=1e3)
    assert relaxed.layer is None and relaxed.full_max_abs <= 1e3


@pytest.mark.hf
def test_lockstep_names_an_inserted_layer_that_is_not_an_identity(qwen_pair: Pair, tmp_path: Path) -> None:
    base, folder, plan = _copy(qwen_pair, tmp_path / "edited")
    j = plan.new_indices[1]  # the copy of layer 4

    def unzero(t: torch.Tensor) -> None:
        assert not t.any(), "expected a zeroed tensor"
        t[5, 7] = 0.5

    _edit_tensor(folder, f"model.layers.{j}.self_attn.o_proj.weight", unzero)
    result = _lockstep(base, Checkpoint.open(folder), plan)
    assert (result.layer, result.position) == (j, 0)
    assert (
        result.divergence == f"inserted layer {j} (copy of base layer 4) is not an identity (output != input)"
    )
    assert result.full_max_abs > 0


@pytest.mark.hf
def test_lockstep_finds_a_flipped_sliding_layer_at_the_window(qwen_pair: Pair, tmp_path: Path) -> None:
    base, folder, plan = _copy(qwen_pair, tmp_path / "edited")
    types = json.loads((folder / "config.json").read_text())["layer_types"]
    j = plan.original_to_new[4]
    assert types[j] == "sliding_attention"
    types[j] = "full_attention"
    _edit_config(folder, layer_types=types)
    result = _lockstep(base, Checkpoint.open(folder), plan)
    # Positions 0..3 see the same keys either way; position 4 is the first whose window drops a key.
    assert (result.layer, result.position) == (j, 4)
    assert result.divergence == f"original layer {j} (base layer 4) output differs"


@pytest.mark.hf
def test_lockstep_names_embedding_and_head(qwen_pair: Pair, tmp_path: Path) -> None:
    ids = _ids(128)  # the tokens _lockstep feeds
    token = int(ids[0, 5])
    first = int((ids == token).any(0).nonzero()[0])

    def bump_row(t: torch.Tensor) -> None:
        t[token] += 0.1

    base, folder, plan = _copy(qwen_pair, tmp_path / "embedding")
    _edit_tensor(folder, "model.embed_tokens.weight", bump_row)
    result = _lockstep(base, Checkpoint.open(folder), plan)
    assert (result.layer, result.position) == (-1, first) and result.divergence == "the embedding differs"

    base, folder, plan = _copy(qwen_pair, tmp_path / "head")
    _edit_tensor(folder, "lm_head.weight", bump_row)  # logit `token` changes at every position
    result = _lockstep(base, Checkpoint.open(folder), plan)
    assert (result.layer, result.position) == (plan.num_layers_out, 0)
    assert result.divergence == "the final norm or lm_head differs (every layer matched)"


# --- memory, cost and inputs (no transformers: the demo checkpoint) ---------------------------------


@pytest.fixture(scope="module")
def demo_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Checkpoint, Checkpoint, ExpansionPlan]:
    root = tmp_path_factory.mktemp("demo")
    base_dir = write_demo_checkpoint(root / "base")  # 8 bf16 layers, sharded
    return _expand(base_dir, root / "out", every=2)  # 12 layers


def _block_bytes(ckpt: Checkpoint) -> list[int]:
    blocks, _ = ckpt.split_blocks()
    prefix = ckpt.family.layer_prefix
    return [sum(ckpt.info(f"{prefix}{j}.{rel}").nbytes for rel in blocks[j]) for j in sorted(blocks)]


def test_lockstep_demo_bf16_exact_and_memory_bounded(
    demo_pair: tuple[Checkpoint, Checkpoint, ExpansionPlan],
) -> None:
    base, exp, plan = demo_pair
    steps: list[tuple[int, int]] = []
    result = _lockstep(base, exp, plan, dtype=torch.bfloat16, progress=lambda d, t: steps.append((d, t)))
    _assert_identical(result)
    head = exp.info("lm_head.weight").nbytes + exp.info("model.norm.weight").nbytes
    embed = exp.info("model.embed_tokens.weight").nbytes
    largest = max(*_block_bytes(exp), *_block_bytes(base))
    # Nothing but one block (or the final norm + head) is ever resident; the embedding is read by rows.
    assert result.peak_bytes_loaded == max(largest, head) <= max(largest, embed, head)
    assert result.peak_bytes_loaded < 0.4 * exp.total_bytes()
    # Every pass (full + each decode step) reads every block of both models once, plus rows and heads.
    blocks = sum(_block_bytes(base)) + sum(_block_bytes(exp))
    passes = 1 + STEPS
    assert passes * blocks < result.bytes_loaded <= passes * (blocks + 2 * (head + embed))
    assert steps[-1] == (passes * plan.num_layers_out + passes * plan.num_layers_in,) * 2
    assert [d for d, _ in steps] == sorted(d for d, _ in steps)


def test_lockstep_demo_finds_altered_layer_in_bf16(
    demo_pair: tuple[Checkpoint, Checkpoint, ExpansionPlan], tmp_path: Path
) -> None:
    base, exp, plan = demo_pair
    folder = tmp_path / "edited"
    shutil.copytree(exp.root, folder)
    j = plan.original_to_new[6]

    def scale(t: torch.Tensor) -> None:
        t.mul_(1.5)

    _edit_tensor(folder, f"model.layers.{j}.input_layernorm.weight", scale)
    result = _lockstep(base, Checkpoint.open(folder), plan, dtype=torch.bfloat16)
    assert (result.layer, result.position) == (j, 0)
    assert result.divergence == f"original layer {j} (base layer 6) output differs"


@pytest.mark.gpu
def test_lockstep_demo_cuda(demo_pair: tuple[Checkpoint, Checkpoint, ExpansionPlan]) -> None:
    base, exp, plan = demo_pair
    _assert_identical(_lockstep(base, exp, plan, device="cuda", dtype=torch.bfloat16))


def test_inputs_are_checked(demo_pair: tuple[Checkpoint, Checkpoint, ExpansionPlan]) -> None:
    base, exp, plan = demo_pair
    with pytest.raises(InputError, match="prefill"):
        _lockstep(base, exp, plan, prefill=SEQ + 1)
    with pytest.raises(InputError, match="layer mapping"):
        run_lockstep(exp, exp, plan, _ids(1024), device="cpu", dtype=torch.float32, prefill=4, decode_steps=1)
    with pytest.raises(InputError, match="token ids"):
        forward_logits(base, torch.tensor([[0, 1024]]))


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, UnsupportedError, "longrope"),
        (
            {"rope_parameters": {"full_attention": {"rope_type": "default"}}},
            UnsupportedError,
            "per-layer-type",
        ),
        ({"partial_rotary_factor": 0.5}, UnsupportedError, "partial_rotary_factor"),
        ({"hidden_act": "gelu"}, UnsupportedError, "hidden_act"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, InputError, "low_freq_factor"),
        ({"num_key_value_heads": 8}, InputError, "num_key_value_heads"),
    ],
)
def test_unsupported_configs_are_refused(
    tmp_path: Path, changes: dict[str, Any], error: type[Exception], match: str
) -> None:
    folder = write_demo_checkpoint(tmp_path / "demo", layers=2)
    _edit_config(folder, **changes)
    with pytest.raises(error, match=match):
        read_spec(Checkpoint.open(folder))


def test_demo_spec_is_read_as_transformers_would(tmp_path: Path) -> None:
    spec = read_spec(Checkpoint.open(write_demo_checkpoint(tmp_path / "demo", layers=2)))
    assert (spec.heads, spec.kv_heads, spec.head_dim, spec.eps) == (8, 4, 32, 1e-5)
    assert spec.windows == (None, None) and not spec.biased and not spec.tied and not spec.qk_norm
    assert (spec.rope.kind, spec.rope.theta, spec.rope.dim) == ("default", 10000.0, 32)
