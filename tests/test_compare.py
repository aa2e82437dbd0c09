"""`llamapro compare A B`: the figures equal an independent computation from transformers' own logits
(max/mean |Δ logit|, mean KL(A‖B), top-1 agreement, perplexities), both engines give the same figures,
identical and identity-expanded models measure exactly zero, long inputs are chunked to the context,
`--max-kl` is the only verdict (exit 1 / 0), and what cannot be compared is exit 3 (vocabularies,
tokenizers that disagree, no tokenizer) or exit 2 (options), one line each, never figures.

Checkpoints are built here: the demo (torch + safetensors only) and tiny transformers models (`hf`), and a
copy of each with one weight changed.
"""

from __future__ import annotations

import os

# MKL rounds by memory alignment unless told not to (read at its first matrix product): the independent
# computation here must round as the command does.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import itertools
import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from llamapro_cli.cli.app import app
from llamapro_cli.demo import write_demo_checkpoint
from llamapro_cli.expand import expand
from llamapro_cli.verify.compare import CompareReport, compare_checkpoints
from llamapro_cli.verify.compare_metrics import ROWS, LogitStats

CHANGED = ("model.layers.2.mlp.down_proj.weight", (3, 5), 0.25)  # one weight of B: (tensor, index, added)
FIGURES = (
    "max_abs_logit_diff", "mean_abs_logit_diff", "mean_kl", "top1_agreement", "cross_entropy_a",
    "cross_entropy_b", "perplexity_a", "perplexity_b", "tokens", "chunks", "chunk_tokens", "predicted_tokens",
)  # fmt: skip


def cli(*args: str | Path) -> Any:
    return CliRunner().invoke(app, ["compare", *map(str, args)])


def as_json(result: Any) -> dict[str, Any]:
    assert result.exit_code in (0, 1), result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def one_error(result: Any, code: int, *words: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: ") and all(line.startswith(("error: ", "hint: ")) for line in lines)
    assert len([line for line in lines if line.startswith("error: ")]) == 1
    for word in words:
        assert word in result.stderr, (word, result.stderr)


def with_one_weight_changed(src: Path, dest: Path) -> Path:
    """A copy of `src` with one element of one tensor changed, rewritten with the safetensors library."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    name, index, added = CHANGED
    weight_map = dest / "model.safetensors.index.json"
    shard = (
        json.loads(weight_map.read_text())["weight_map"][name] if weight_map.exists() else "model.safetensors"
    )
    with safe_open(str(dest / shard), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(dest / shard))
    tensors[name] = tensors[name].clone()
    tensors[name][index] += added
    save_file(tensors, str(dest / shard), metadata=metadata)
    return dest


def seeded_ids(vocab: int, length: int, seed: int) -> torch.Tensor:
    """The ids `--tokens N --seed S` documents: torch.randint from a generator seeded with S."""
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def expected(logits_a: torch.Tensor, logits_b: torch.Tensor, chunks: list[torch.Tensor]) -> dict[str, float]:
    """The figures from whole (tokens, vocab) logits with torch's own functions, in float64."""
    la, lb = logits_a.double(), logits_b.double()
    log_p, log_q = F.log_softmax(la, dim=-1), F.log_softmax(lb, dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # KL(p‖q) per position
    starts = [0]
    for c in chunks:
        starts.append(starts[-1] + c.shape[1])
    rows = torch.cat([torch.arange(s, e - 1) for s, e in itertools.pairwise(starts)])
    following = torch.cat([c[0, 1:] for c in chunks])
    ce_a = float(F.cross_entropy(la[rows], following))
    ce_b = float(F.cross_entropy(lb[rows], following))
    return {
        "max_abs_logit_diff": float((la - lb).abs().max()),
        "mean_abs_logit_diff": float((la - lb).abs().mean()),
        "mean_kl": float(kl.mean()),
        "top1_agreement": float((la.argmax(-1) == lb.argmax(-1)).double().mean()),
        "cross_entropy_a": ce_a,
        "cross_entropy_b": ce_b,
        "perplexity_a": math.exp(ce_a),
        "perplexity_b": math.exp(ce_b),
    }


def assert_figures(doc: dict[str, Any], want: dict[str, float]) -> None:
    # The same logits: the max is one of them, exactly; sums are taken in another order (64 rows at a time).
    assert doc["max_abs_logit_diff"] == want["max_abs_logit_diff"]
    assert doc["top1_agreement"] == want["top1_agreement"]
    for key in ("mean_abs_logit_diff", "mean_kl", "cross_entropy_a", "cross_entropy_b"):
        assert doc[key] == pytest.approx(want[key], rel=1e-9, abs=1e-15), key
    for key in ("perplexity_a", "perplexity_b"):
        assert doc[key] == pytest.approx(want[key], rel=1e-9), key


def hf_logits(folder: Path, chunks: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """transformers' own logits for each chunk (each from position 0), as (tokens, vocab)."""
    import tiny_models

    model = tiny_models.load_model(folder, dtype=dtype)
    return torch.cat([tiny_models.logits_full(model, c)[0] for c in chunks])


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_pair(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(the 4-layer demo, its `expand --every 2`, the demo with one weight changed). Read-only."""
    root = tmp_path_factory.mktemp("compare-demo")
    expand(demo, root / "pro", every=2)
    return demo, root / "pro", with_one_weight_changed(demo, root / "changed")


@pytest.fixture(scope="module")
def tiny_pair(
    tiny_model: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str, str], tuple[Path, Path]]:
    """(tiny model, the same with one weight changed) per family and variant. Read-only."""
    cache: dict[tuple[str, str], tuple[Path, Path]] = {}

    def make(family: str, variant: str = "default") -> tuple[Path, Path]:
        if (family, variant) not in cache:
            base = tiny_model(family, variant)
            changed = tmp_path_factory.mktemp(f"changed-{family}-{variant}") / "changed"
            cache[family, variant] = (base, with_one_weight_changed(base, changed))
        return cache[family, variant]

    return make


def word_tokenizer(folder: Path, letters: str = "abcdefghijklmnopqrstuvwxyz") -> None:
    """A word-level tokenizer saved into `folder`: [UNK] is 0, `letters[i]` is i + 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{ch: i + 1 for i, ch in enumerate(letters)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)


# --- zero where nothing differs -------------------------------------------------------------------------


def _assert_zero(doc: dict[str, Any]) -> None:
    assert (doc["max_abs_logit_diff"], doc["mean_abs_logit_diff"], doc["mean_kl"]) == (0.0, 0.0, 0.0)
    assert doc["top1_agreement"] == 1.0
    assert doc["perplexity_a"] == doc["perplexity_b"] and doc["perplexity_a"] > 1.0
    assert doc["cross_entropy_a"] == doc["cross_entropy_b"]


@pytest.mark.parametrize("engine", ["native", pytest.param("transformers", marks=pytest.mark.hf)])
def test_a_checkpoint_against_itself_measures_zero(demo: Path, engine: str) -> None:
    if engine == "transformers":
        pytest.importorskip("transformers")
    doc = as_json(cli(demo, demo, "--engine", engine, "--json"))
    _assert_zero(doc)
    assert (doc["tokens"], doc["predicted_tokens"], doc["chunks"]) == (32, 31, 1)  # verify-identity's default


@pytest.mark.parametrize("engine", ["native", pytest.param("transformers", marks=pytest.mark.hf)])
def test_an_identity_expansion_measures_zero_against_its_base(
    demo_pair: tuple[Path, Path, Path], engine: str
) -> None:
    if engine == "transformers":
        pytest.importorskip("transformers")
    base, pro, _ = demo_pair
    result = cli(base, pro, "--engine", engine, "--tokens", "48", "--max-kl", "0")
    assert result.exit_code == 0, result.stderr
    for row in (
        r"max \|Δ logit\| +0",
        r"mean KL\(A‖B\) +0",
        r"top-1 agreement +100\.0% \(48 of 48 positions\)",
    ):
        assert re.search(rf"^{row}$", result.stdout, flags=re.M), (row, result.stdout)
    assert re.search(r"^--max-kl +0: mean KL within$", result.stdout, flags=re.M)
    doc = as_json(cli(base, pro, "--engine", engine, "--tokens", "48", "--max-kl", "0", "--json"))
    _assert_zero(doc)
    assert (doc["num_layers_a"], doc["num_layers_b"], doc["within_max_kl"]) == (4, 6, True)


# --- the figures, against an independent computation ------------------------------------------------------


@pytest.mark.hf
@pytest.mark.parametrize("engine", ["transformers", "native"])
@pytest.mark.parametrize(
    ("family", "variant"), [("llama", "default"), ("mistral", "default"), ("qwen3", "sliding")]
)
def test_one_changed_weight_gives_the_figures_of_transformers_logits(
    tiny_pair: Callable[[str, str], tuple[Path, Path]], family: str, variant: str, engine: str
) -> None:
    base, changed = tiny_pair(family, variant)
    doc = as_json(cli(base, changed, "--engine", engine, "--tokens", "40", "--seed", "3", "--json"))
    ids = seeded_ids(128, 40, 3)
    want = expected(hf_logits(base, [ids], torch.float32), hf_logits(changed, [ids], torch.float32), [ids])
    assert want["mean_kl"] > 0 and want["max_abs_logit_diff"] > 0  # the change shows
    assert_figures(doc, want)
    assert (doc["engine"], doc["dtype"], doc["seed"], doc["input"]) == (
        engine,
        "float32",
        3,
        "random token ids",
    )


@pytest.mark.hf
def test_both_engines_give_the_same_figures_on_chunked_bf16(demo_pair: tuple[Path, Path, Path]) -> None:
    """600 tokens on the demo (512 positions): two chunks, each from position 0; bf16 as the checkpoint."""
    pytest.importorskip("transformers")
    base, _, changed = demo_pair
    docs = {
        e: as_json(cli(base, changed, "--engine", e, "--tokens", "600", "--json"))
        for e in ("transformers", "native")
    }
    ids = seeded_ids(1024, 600, 0)
    chunks = [ids[:, :512], ids[:, 512:]]
    want = expected(
        hf_logits(base, chunks, torch.bfloat16), hf_logits(changed, chunks, torch.bfloat16), chunks
    )
    for doc in docs.values():
        assert (doc["tokens"], doc["chunks"], doc["chunk_tokens"], doc["predicted_tokens"]) == (
            600,
            2,
            512,
            598,
        )
        assert doc["dtype"] == "bfloat16"
        assert_figures(doc, want)
    assert {k: docs["native"][k] for k in FIGURES} == {k: docs["transformers"][k] for k in FIGURES}


def test_streamed_sums_equal_the_whole_computation() -> None:
    """Pieces of rows, each cut into blocks of ROWS, give what one pass over the whole logits gives."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(1, 2 * ROWS + 22, 50, generator=gen)
    b = a + 0.3 * torch.randn(a.shape, generator=gen)
    ids = torch.randint(0, 50, (1, a.shape[1]), generator=gen)
    stats = LogitStats()
    for start, stop in ((0, 70), (70, a.shape[1])):  # two pieces of one chunk
        targets = torch.full((stop - start,), -1)
        following = ids[0, start + 1 : stop + 1]
        targets[: following.numel()] = following
        stats.add(a[:, start:stop], b[:, start:stop], targets)
    got = stats.metrics()
    want = expected(a[0], b[0], [ids])
    assert got.positions == a.shape[1] and got.predicted == a.shape[1] - 1
    assert_figures({k: getattr(got, k) for k in want}, want)


def test_logits_that_are_not_finite_give_null_figures_and_valid_json() -> None:
    a = torch.zeros(1, 3, 4)
    b = a.clone()
    b[0, 1, 2] = float("inf")
    stats = LogitStats()
    stats.add(a, b, torch.tensor([1, 2, -1]))
    got = stats.metrics()
    assert (got.nonfinite_a, got.nonfinite_b) == (0, 1)
    assert got.max_abs_logit_diff is None and got.mean_kl is None and got.mean_abs_logit_diff is None
    assert got.cross_entropy_a == pytest.approx(math.log(4)) and got.top1_agreement == pytest.approx(2 / 3)
    json.dumps(got.__dict__, allow_nan=False)
    # an entry both models mask with -inf (probability 0 on both sides) adds nothing: no NaN from 0 * inf
    x = torch.randn(1, 5, 6, generator=torch.Generator().manual_seed(2))
    y = x + 0.1
    y[0, :, 0] += 0.5
    masked = [t.clone() for t in (x, y)]
    for t in masked:
        t[0, :, 5] = float("-inf")
    both, plain = LogitStats(), LogitStats()
    both.add(*masked, torch.full((5,), -1))
    plain.add(x[..., :5], y[..., :5], torch.full((5,), -1))
    assert (both.metrics().nonfinite_a, both.metrics().nonfinite_b) == (5, 5)
    assert (
        both.metrics().mean_kl == pytest.approx(plain.metrics().mean_kl, rel=1e-12)
        and plain.metrics().mean_kl
    )
    assert both.metrics().max_abs_logit_diff == plain.metrics().max_abs_logit_diff


# --- the verdict: only with --max-kl ------------------------------------------------------------------------


def test_max_kl_is_a_gate_exit_1_above_exit_0_at_or_below(demo_pair: tuple[Path, Path, Path]) -> None:
    base, _, changed = demo_pair
    measured = as_json(cli(base, changed, "--engine", "native", "--json"))["mean_kl"]
    assert measured > 0
    above = cli(base, changed, "--engine", "native", "--max-kl", f"{measured / 2!r}")
    assert above.exit_code == 1 and "mean KL ABOVE" in above.stdout
    assert above.stderr.splitlines() == [
        f"error: mean KL(A‖B) {measured:.4g} is above --max-kl {measured / 2:g}"
    ]
    at = cli(base, changed, "--engine", "native", "--max-kl", repr(measured), "--json")
    assert at.exit_code == 0 and as_json(at)["within_max_kl"] is True and as_json(at)["max_kl"] == measured
    plain = cli(base, changed, "--engine", "native")
    assert plain.exit_code == 0 and "--max-kl" not in plain.stdout  # no limit, no verdict


# --- inputs ----------------------------------------------------------------------------------------------


@pytest.mark.hf
def test_text_through_the_shared_tokenizer(
    tiny_pair: Callable[[str, str], tuple[Path, Path]], tmp_path: Path
) -> None:
    base, changed = (
        shutil.copytree(p, tmp_path / n) for p, n in zip(tiny_pair("llama", "default"), "ab", strict=True)
    )
    for folder in (base, changed):
        word_tokenizer(folder)
    letters = "thequickbrownfoxjumpsoverthelazydog" * 3
    (tmp_path / "eval.txt").write_text(" ".join(letters))
    doc = as_json(cli(base, changed, "--text", tmp_path / "eval.txt", "--json"))
    ids = torch.tensor([[ord(ch) - ord("a") + 1 for ch in letters]])
    want = expected(hf_logits(base, [ids], torch.float32), hf_logits(changed, [ids], torch.float32), [ids])
    assert (doc["input"], doc["text"], doc["tokens"], doc["seed"]) == (
        "text",
        str(tmp_path / "eval.txt"),
        len(letters),
        None,
    )
    assert_figures(doc, want)
    prompt = as_json(cli(base, changed, "--prompt", " ".join(letters[:20]), "--max-tokens", "12", "--json"))
    assert (prompt["input"], prompt["tokens"]) == ("prompt", 12)
    assert prompt["warnings"] == ["prompt cut to its first 12 tokens (of 20): --max-tokens"]
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (changed / name).unlink(missing_ok=True)
    alone = as_json(cli(base, changed, "--prompt", " ".join(letters[:20]), "--json"))
    assert alone["warnings"] == [f"only {base} has a tokenizer: its tokens are fed to both models"]
    assert (alone["input"], alone["tokens"], alone["predicted_tokens"]) == ("prompt", 20, 19)


@pytest.mark.hf
def test_tokenizers_that_disagree_on_the_text_exit_3(
    tiny_pair: Callable[[str, str], tuple[Path, Path]], tmp_path: Path
) -> None:
    base, changed = (
        shutil.copytree(p, tmp_path / n) for p, n in zip(tiny_pair("llama", "default"), "ab", strict=True)
    )
    word_tokenizer(base)
    word_tokenizer(changed, letters="zyxwvutsrqponmlkjihgfedcba")
    (tmp_path / "eval.txt").write_text("a b c")
    one_error(
        cli(base, changed, "--text", tmp_path / "eval.txt"),
        3,
        "tokenize the text differently",
        "token 0 is 1 in A and 26 in B",
        "hint: compare needs two models that share a tokenizer",
    )
    one_error(cli(base, changed, "--prompt", "n"), 3, "tokenize the prompt differently")


def test_text_without_a_tokenizer_exits_3_with_a_hint(demo: Path, tmp_path: Path) -> None:
    (tmp_path / "eval.txt").write_text("hello")
    one_error(
        cli(demo, demo, "--text", tmp_path / "eval.txt"), 3, "has tokenizer files", "hint: use --tokens N"
    )


def test_a_text_that_is_not_utf8_or_missing_exits_3(demo: Path, tmp_path: Path) -> None:
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    one_error(cli(demo, demo, "--text", tmp_path / "latin1.txt"), 3, "needs UTF-8 text (byte 3 is not)")
    one_error(cli(demo, demo, "--text", tmp_path / "absent.txt"), 3, "absent.txt: the --text file is missing")


def test_random_ids_are_capped_by_max_tokens_with_a_warning(demo: Path) -> None:
    result = cli(demo, demo, "--engine", "native", "--tokens", "100", "--max-tokens", "40", "--json")
    doc = as_json(result)
    assert (doc["tokens"], doc["warnings"]) == (
        40,
        ["random token ids capped at 40 (asked for 100): --max-tokens"],
    )
    assert "warning: random token ids capped at 40" in result.stderr


# --- what cannot be compared, and bad options -------------------------------------------------------------


def test_an_unknown_architecture_exits_3(demo: Path, tmp_path: Path) -> None:
    other = shutil.copytree(demo, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(
        json.dumps({**config, "model_type": "bert", "architectures": ["BertModel"]})
    )
    one_error(cli(demo, other), 3, "unsupported architecture: model_type 'bert'")


def test_different_vocabularies_exit_3(demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llamapro_cli import demo as demo_module

    monkeypatch.setitem(demo_module.DEMO_CONFIG, "vocab_size", 512)
    small = write_demo_checkpoint(tmp_path / "small", layers=4)
    one_error(
        cli(demo, small, "--engine", "native"),
        3,
        "vocabulary of 1024 tokens",
        "one of 512",
        "same vocabulary",
    )


@pytest.mark.hf
def test_native_engine_refuses_a_family_it_cannot_run(tiny_model: Callable[..., Path]) -> None:
    gemma = tiny_model("gemma2")
    one_error(
        cli(gemma, gemma, "--engine", "native"),
        3,
        "native engine does not support gemma2",
        "hint: use --engine transformers",
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tokens", "8", "--prompt", "x"], "--prompt and --tokens exclude each other"),
        (["--tokens", "1"], "--tokens must be at least 2"),
        (["--max-tokens", "1"], "--max-tokens must be between 2 and 1048576, got 1"),
        (["--max-tokens", "999999999999999999"], "--max-tokens must be between 2 and 1048576"),
        (["--max-kl", "-1"], "--max-kl must be zero or a positive number, got -1.0"),
        (["--max-kl", "nan"], "--max-kl must be zero or a positive number, got nan"),
        (["--engine", "vllm"], "--engine 'vllm' is not one of auto, transformers, native"),
    ],
)
def test_bad_options_are_one_line_usage_errors(demo: Path, args: list[str], message: str) -> None:
    one_error(cli(demo, demo, *args), 2, message)


# --- the document -------------------------------------------------------------------------------------------


def test_json_document_is_the_report(demo_pair: tuple[Path, Path, Path]) -> None:
    import dataclasses

    base, _, changed = demo_pair
    result = cli(base, changed, "--engine", "native", "--device", "cpu", "--json", "--max-kl", "1")
    doc = as_json(result)
    assert result.stderr == ""  # --json: no progress lines
    assert list(doc) == ["schema_version", *(f.name for f in dataclasses.fields(CompareReport))]
    assert doc["schema_version"] == 1
    assert (doc["a"], doc["b"], doc["architecture_a"], doc["vocab_size"]) == (
        str(base),
        str(changed),
        "llama",
        1024,
    )
    assert (doc["engine"], doc["device"], doc["text"], doc["max_kl"], doc["within_max_kl"]) == (
        "native",
        "cpu",
        None,
        1.0,
        True,
    )
    assert 0 < doc["peak_bytes_loaded"] < doc["peak_rss_bytes"] and doc["peak_gpu_bytes"] is None
    assert 0 < doc["top1_agreement"] <= 1 and doc["mean_kl"] > 0
    report = compare_checkpoints(base, changed, engine="native")
    assert {k: getattr(report, k) for k in FIGURES} == {k: doc[k] for k in FIGURES}


# --- no code from a checkpoint ----------------------------------------------------------------------------

EVIL = "from pathlib import Path\nPath({marker!r}).write_text('checkpoint code ran')\n"


@pytest.mark.hf
def test_code_in_a_checkpoint_never_runs(
    demo_pair: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tokenizer or a model only the checkpoint's own code (`auto_map`) could build is refused before
    anything loads; beside a model transformers implements, its own class runs and the planted code never."""
    pytest.importorskip("transformers")
    from llamapro_cli.verify import hf_engine

    base, pro, _ = demo_pair
    marker = tmp_path / "PWNED"
    evil = shutil.copytree(pro, tmp_path / "evil")
    for module in ("tokenizer_evil", "modeling_evil"):
        (evil / f"{module}.py").write_text(EVIL.format(marker=str(marker)))
    auto_map = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    config = json.loads((evil / "config.json").read_text())
    (evil / "config.json").write_text(json.dumps({**config, "auto_map": auto_map}))
    # transformers implements llama: its own class runs, the checkpoint's module never does
    assert as_json(cli(base, evil, "--engine", "transformers", "--json"))["mean_kl"] == 0.0
    monkeypatch.setattr(hf_engine, "_implemented", lambda model_type: False)  # as if it did not
    one_error(cli(base, evil, "--engine", "transformers"), 3, "auto_map asks it to run the checkpoint's code")
    monkeypatch.undo()
    tokenizer = {
        "tokenizer_class": "EvilTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenizer_evil.Evil", None]},
    }
    (evil / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    one_error(
        cli(evil, evil, "--prompt", "def fib(n):"), 3, "its tokenizer", "never runs code from a checkpoint"
    )
    assert not marker.exists()


# --- on a GPU ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_gives_the_figures_of_the_cpu(demo_pair: tuple[Path, Path, Path]) -> None:
    """float32 on CUDA: other kernels, so other roundings, but the same figures to a few digits; the
    identity expansion still measures exactly zero."""
    base, pro, changed = demo_pair
    cpu = as_json(cli(base, changed, "--engine", "native", "--dtype", "float32", "--device", "cpu", "--json"))
    for engine in ("native", "transformers"):
        gpu = as_json(
            cli(base, changed, "--engine", engine, "--dtype", "float32", "--device", "cuda", "--json")
        )
        assert gpu["device"] == "cuda" and gpu["peak_gpu_bytes"] > 0
        for key in ("max_abs_logit_diff", "mean_abs_logit_diff", "mean_kl", "perplexity_a", "perplexity_b"):
            assert gpu[key] == pytest.approx(cpu[key], rel=1e-3), (engine, key)
        zero = as_json(cli(base, pro, "--engine", engine, "--device", "cuda", "--json"))
        _assert_zero(zero)
