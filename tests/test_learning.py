"""verify-frozen --report: how far training moved each new layer, measured exactly, in bounded chunks.

A tiny expanded model is trained a few steps with torch SGD on two of its three new layers
(`scripts/demo_train.py`, the same code `make demo` runs); the report's numbers are checked against the
same norms computed directly on whole tensors, its verdicts against which layers were trained.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from llamapro_cli.cli.app import app
from llamapro_cli.expand import expand
from llamapro_cli.freeze.learning import Kind, learning_report

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

ROOT = Path(__file__).resolve().parent.parent
TRAINED_LAYERS = [2, 5]  # of the new layers 2, 5, 8 (6 layers expanded --every 2); 8 stays untouched


def _demo_train() -> Any:
    spec = importlib.util.spec_from_file_location("demo_train", ROOT / "scripts" / "demo_train.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(expanded with digests, trained) for the module; both read-only."""
    root = tmp_path_factory.mktemp("learning")
    expanded = root / "pro"
    expand(tiny_model("llama"), expanded, every=2, digests=True)
    _demo_train().train(expanded, root / "trained", steps=3, lr=0.5, layers=TRAINED_LAYERS)
    return expanded, root / "trained"


def _load(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def test_report_measures_each_tensor_exactly(run: tuple[Path, Path]) -> None:
    expanded, trained = run
    report = learning_report(expanded, trained)
    assert report.audit.ok
    before, after = _load(expanded), _load(trained)
    learning = report.learning
    assert [x.index for x in learning.layers] == [2, 5, 8]
    assert {x.index: x.verdict for x in learning.layers} == {2: "changed", 5: "changed", 8: "did not change"}
    assert [x.source for x in learning.layers] == [1, 3, 5]
    for t in learning.tensors:
        w, w0 = after[t.name].double(), before[t.name].double()
        # each copy sits right after its source here (expand --every 2 of 6 layers)
        source = before[t.name.replace(f"layers.{t.layer}.", f"layers.{t.layer - 1}.")]
        assert t.changed == (not torch.equal(w, w0)), t.name
        assert t.delta_norm == pytest.approx((w - w0).norm().item(), rel=1e-12, abs=1e-300)
        assert t.source_norm == pytest.approx(source.double().norm().item(), rel=1e-12)
        if t.kind == Kind.ZERO:
            assert torch.count_nonzero(w0) == 0
            assert t.rms == pytest.approx(math.sqrt((w * w).mean().item()), rel=1e-12, abs=1e-300)
        else:
            assert t.kind == Kind.COPY and t.relative == pytest.approx(
                t.delta_norm / t.source_norm, rel=1e-12
            )
    layer2 = learning.layers[0]
    assert layer2.changed_tensors == layer2.tensors == sum(t.layer == 2 for t in learning.tensors)
    assert layer2.max_relative_tensor and layer2.max_zero_rms_tensor in {
        "self_attn.o_proj.weight",
        "mlp.down_proj.weight",
    }
    assert learning.others == ()


def test_chunked_reads_give_the_same_numbers(run: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    expanded, trained = run
    whole = learning_report(expanded, trained).learning
    monkeypatch.setattr("llamapro_cli.freeze.learning.CHUNK", 8 * 100)  # 100 elements per chunk
    chunked = learning_report(expanded, trained).learning
    for a, b in zip(whole.tensors, chunked.tensors, strict=True):
        assert a.changed == b.changed and a.delta_norm == pytest.approx(b.delta_norm, rel=1e-12)
        assert a.rms == pytest.approx(b.rms, rel=1e-12)


def test_manifest_takes_initial_values_from_the_frozen_sources(
    run: tuple[Path, Path], tmp_path: Path
) -> None:
    expanded, trained = run
    manifest = tmp_path / "map.json"
    result = CliRunner().invoke(app, ["freeze-map", str(expanded), "--format", "json"])
    manifest.write_text(result.stdout)
    by_folder = learning_report(expanded, trained).learning
    by_manifest = learning_report(manifest, trained).learning
    assert by_manifest.initial_values != by_folder.initial_values
    assert [x.verdict for x in by_manifest.layers] == [x.verdict for x in by_folder.layers]
    for a, b in zip(by_folder.tensors, by_manifest.tensors, strict=True):
        assert a.delta_norm == pytest.approx(b.delta_norm, rel=1e-12) and a.source_norm == pytest.approx(
            b.source_norm
        )


def test_a_changed_original_tensor_is_measured_too(run: tuple[Path, Path], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    expanded, trained = run
    tensors = _load(trained)
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name] * 1.01
    (tmp_path / "t").mkdir()
    save_file(tensors, str(tmp_path / "t" / "model.safetensors"), metadata={"format": "pt"})
    report = learning_report(expanded, tmp_path / "t")
    assert not report.audit.ok
    (other,) = report.learning.others
    assert other.name == name and other.kind == Kind.ORIGINAL and other.changed
    assert other.relative == pytest.approx(0.01, rel=1e-3)


def test_cli_report_table_json_and_plot(run: tuple[Path, Path], tmp_path: Path) -> None:
    expanded, trained = run
    args = ["verify-frozen", "--map", str(expanded), "--trained", str(trained)]
    result = CliRunner().invoke(app, [*args, "--report"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line[:1].isdigit()}
    assert "did not change" in rows["8"] and " changed" in rows["2"] and "did not" not in rows["2"]
    doc = json.loads(CliRunner().invoke(app, [*args, "--report", "--json"]).stdout)
    assert doc["audit"]["ok"] is True and len(doc["learning"]["layers"]) == 3
    png = tmp_path / "moves.png"
    plotted = CliRunner().invoke(app, [*args, "--plot", str(png)])
    assert plotted.exit_code == 0, plotted.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_clear_error(
    run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    expanded, trained = run
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = CliRunner().invoke(
        app,
        [
            "verify-frozen",
            "--map",
            str(expanded),
            "--trained",
            str(trained),
            "--plot",
            str(tmp_path / "p.png"),
        ],
    )
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --plot needs matplotlib") and "[plot]" in result.stderr
    assert not (tmp_path / "p.png").exists()
