"""`verify-identity --engine vllm|llama.cpp|mlx` in the real engines (opt-in: `make test-engines`).

Each case is a fact measured in that engine, kept by its exit code: 0 bit-identical, 1 different (with
the known cause named), 3 the engine refuses the model (its reason quoted). The figures of every run
(max |Δ| in the engine, the engine's base against transformers' base) are printed in a table at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llamapro_cli.errors import InputError
from llamapro_cli.verify.identity import verify_identity

# (engine, model, dtype) -> expected exit code. Models: tests/engines/conftest.py TINY, plus "demo".
EXPECTED: dict[tuple[str, str, str], int] = {
    # MLX: bit-identical everywhere, except Gemma 3, whose sliding layers mlx-lm takes from the index.
    **{("mlx", m, "float32"): 0 for m in ("llama", "mistral", "qwen2", "qwen2-sliding", "qwen3", "gemma2")},
    ("mlx", "gemma3", "float32"): 1,
    ("mlx", "demo", "bfloat16"): 0,
    # llama.cpp (GGUF f32): Gemma 2 and Gemma 3 differ as converted (index-derived sliding pattern).
    **{("llama.cpp", m, "float32"): 0 for m in ("llama", "mistral", "qwen2", "qwen2-sliding", "qwen3")},
    ("llama.cpp", "gemma2", "float32"): 1,
    ("llama.cpp", "gemma3", "float32"): 1,
    ("llama.cpp", "demo", "float32"): 0,
    # vLLM: fp32 bit-identical; bf16 differs (residual rounding); Qwen2 with sliding layers refused.
    **{("vllm", m, "float32"): 0 for m in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")},
    ("vllm", "qwen2-sliding", "float32"): 3,
    ("vllm", "llama", "bfloat16"): 1,
    ("vllm", "demo", "bfloat16"): 1,
}


def check(engine: str, pair: Any, dtype: str, python: Path) -> tuple[int, Any, str | None]:
    """(exit code, report or None, error message) as the CLI would give them."""
    try:
        report = verify_identity(
            pair.expanded, base=pair.base, engine=engine, dtype=dtype, engine_python=python
        )
    except InputError as e:
        return e.exit_code, None, e.message
    return (0 if report.verdict == "identical" else 1), report, None


@pytest.mark.parametrize(("engine", "model", "dtype"), list(EXPECTED), ids=["-".join(k) for k in EXPECTED])
def test_verify_identity_in_the_engine(
    engine: str,
    model: str,
    dtype: str,
    pairs: dict[str, Any],
    engine_python: Callable[[str], Path],
    recorder: Callable[..., None],
) -> None:
    code, report, error = check(engine, pairs[model], dtype, engine_python(engine))
    serving = report.serving if report is not None else None
    recorder(
        engine=engine,
        model=model,
        dtype=dtype,
        exit=code,
        full_max_abs=report.full_max_abs if report else None,
        cached_max_abs=report.cached_max_abs if report else None,
        greedy_equal=report.greedy_tokens_equal if report else None,
        vs_transformers=serving.transformers_max_abs if serving else None,
        fixed_max_abs=serving.pattern_fix_max_abs if serving else None,
        note=error or (report.reason if report and report.reason else ""),
    )
    assert code == EXPECTED[(engine, model, dtype)], error or (report.reason if report else "")
    if code == 3:
        assert error is not None and f"{engine} cannot" in error
        return
    assert serving is not None and serving.versions and serving.engine == engine
    assert report.tokens > 4 + report.decode_steps  # past every window of the tiny models (4)
    if code == 1:
        assert report.reason is not None and "(known: " in report.reason and report.hint == serving.hint
    if (engine, model) in {("llama.cpp", "gemma2"), ("llama.cpp", "gemma3")}:
        assert serving.pattern_fix_max_abs == 0, serving.pattern_fix_note
        assert "bit-identical" in (serving.pattern_fix_note or "")


def test_gguf_pattern_makes_the_gemma2_gguf_exact(
    pairs: dict[str, Any], engine_python: Callable[[str], Path], tmp_path: Path, recorder: Callable[..., None]
) -> None:
    """The user's path: convert, `llamapro gguf-pattern`, then run both GGUFs in llama.cpp."""
    from llamapro_cli.checkpoint import Checkpoint
    from llamapro_cli.verify.engines import gguf
    from llamapro_cli.verify.engines.compare import engine_result
    from llamapro_cli.verify.engines.protocol import Job, read_arrays
    from llamapro_cli.verify.engines.runner import run_adapter
    from llamapro_cli.verify.engines.spec import ServingEngine

    python = engine_python("llama.cpp")
    pair = pairs["gemma2"]
    base_gguf, exp_gguf = tmp_path / "base.gguf", tmp_path / "pro.gguf"
    gguf.convert(Checkpoint.open(pair.base), base_gguf, "float32", python, tmp_path, [])
    gguf.convert(Checkpoint.open(pair.expanded), exp_gguf, "float32", python, tmp_path, [])
    fixed = tmp_path / "pro-fixed.gguf"
    done = subprocess.run(
        [sys.executable, "-m", "llamapro_cli", "gguf-pattern", str(pair.expanded), str(exp_gguf), str(fixed),
         "--engine-python", str(python)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.strip() == str(fixed) and "wrote gemma2.attention.sliding_window_pattern" in done.stderr
    )
    info = gguf.inspect_ggufs(python, [fixed], tmp_path)[0]
    assert info.pattern == [True, False, False, True, False, False, True, False, False]
    ids = list(range(3, 35))
    models = (("base", base_gguf), ("asis", exp_gguf), ("fixed", fixed))
    job = Job("llama.cpp", "float32", "cpu", os.cpu_count() or 1, ids, 24, 8, models, {})
    work = tmp_path / "run"
    work.mkdir()
    run_adapter(ServingEngine.LLAMA_CPP, python, job, work)
    got = {name: read_arrays(work, name, tokens=32, decode_steps=8) for name, _ in models}
    as_is, after = engine_result(got["base"], got["asis"], 0.0), engine_result(got["base"], got["fixed"], 0.0)
    recorder(
        engine="llama.cpp",
        model="gemma2 via gguf-pattern",
        dtype="float32",
        exit=0,
        full_max_abs=after.full_max_abs,
        cached_max_abs=after.cached_max_abs,
        greedy_equal=after.tokens_equal,
        note=f"as converted: max |Δ| {as_is.full_max_abs:.3g}",
    )
    assert not as_is.identical(0.0) and after.identical(0.0)


def test_the_cli_reports_an_engine_run_on_stdout_and_exits_with_the_verdict(
    pairs: dict[str, Any], engine_python: Callable[[str], Path]
) -> None:
    python = engine_python("mlx")
    pair = pairs["llama"]
    command = [sys.executable, "-m", "llamapro_cli", "verify-identity", "--out", str(pair.expanded)]
    engine = ["--engine", "mlx", "--engine-python", str(python)]
    done = subprocess.run(
        [*command, *engine, "--prompt", "the same logits", "--json"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["engine"] == "mlx" and doc["input"] == "prompt" and doc["verdict"] == "identical"
    assert doc["serving"]["versions"]["mlx"] == "0.32.4" and doc["serving"]["outputs"] == "logits"
    table = subprocess.run(
        [*command, *engine],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert table.returncode == 0 and "engine version" in table.stdout and "vs transformers" in table.stdout
