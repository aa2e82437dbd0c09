"""How `verify-frozen --report` shows what training did: a text table and a bar chart.

`table(report)` is the human table as plain text (one row per new layer, then the other tensors that
moved); `preamble`, `HEADER`, `rows` and `others` are its parts, for the CLI's renderer;
`write_plot(report, path)` draws one bar per new layer (relative change of its copied tensors, RMS of its
zero-initialised ones) into a PNG with matplotlib, an optional extra (`pip install 'llamapro-cli[plot]'`).
`require_matplotlib()` says early, before any tensor is read, that the extra is missing.

Invariant: both views show the report's numbers, nothing recomputed. Must not: read tensors; print.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamapro_cli.errors import OutputError, UsageError

if TYPE_CHECKING:
    from llamapro_cli.freeze.learning import LearningReport, TensorMove

PLOT_HINT = "install the plot extra: pip install 'llamapro-cli[plot]' (matplotlib)"


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


HEADER = ("layer", "from", "verdict", "tensors changed", "copied: mean", "max (tensor)", "zero-init RMS max")


def preamble(report: LearningReport) -> list[str]:
    """The lines above the table: what the numbers are, and what they are measured from."""
    return [
        "what training did: |W_trained - W_initial| / |W_source| for copied tensors, RMS for the "
        "zero-initialised ones",
        f"initial values: {report.initial_values}",
    ]


def rows(report: LearningReport) -> list[tuple[str, ...]]:
    """One row per new layer, in the columns of `HEADER`."""
    return [
        (
            str(layer.index),
            "-" if layer.source is None else str(layer.source),
            layer.verdict,
            f"{layer.changed_tensors}/{layer.tensors}",
            _g(layer.mean_relative),
            _named(layer.max_relative, layer.max_relative_tensor),
            _named(layer.max_zero_rms, layer.max_zero_rms_tensor),
        )
        for layer in report.layers
    ]


def others(report: LearningReport) -> list[str]:
    """One line per tensor outside the new layers that moved (or could not be measured)."""
    return [_other(t) for t in report.others if t.changed is not False]


def table(report: LearningReport) -> str:
    """The whole report as plain text: `preamble`, the table of `rows`, then `others`."""
    lines = [*preamble(report), ""]
    body = [HEADER, *rows(report)]
    widths = [max(len(r[i]) for r in body) for i in range(len(HEADER))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in body]
    moved = others(report)
    if moved:
        lines += ["", "outside the new layers:"]
        lines += [f"  {line}" for line in moved]
    return "\n".join(lines) + "\n"


def _named(value: float | None, tensor: str | None) -> str:
    return f"{_g(value)} ({tensor})" if value and tensor else _g(value)


def _other(t: TensorMove) -> str:
    if t.changed is None and t.delta_norm is None:
        return f"{t.name}: not measured (missing, or not a float tensor)"
    if t.delta_norm is None:
        return f"{t.name}: changed (a manifest holds no initial values to measure it by)"
    verdict = "changed" if t.changed else "did not change"
    return f"{t.name}: {verdict}, |dW|/|W| {_g(t.relative)}, RMS(dW) {_g(t.rms)}"


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib, which is not installed", hint=PLOT_HINT) from None


def write_plot(report: LearningReport, path: Path) -> None:
    """One PNG: per new layer, the relative change of its copied tensors (mean and max) and the largest
    RMS of its zero-initialised tensors, each on its own axis (they have different scales)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # no display needed; never opens a window
    import matplotlib.pyplot as plt

    labels = [f"{x.index}" + (f"\n(from {x.source})" if x.source is not None else "") for x in report.layers]
    positions = list(range(len(labels)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(8.0, 0.7 * len(labels) + 4), 4.5))
    width = 0.4
    left.bar(
        [p - width / 2 for p in positions],
        [x.mean_relative or 0.0 for x in report.layers],
        width,
        label="mean",
    )
    left.bar(
        [p + width / 2 for p in positions], [x.max_relative or 0.0 for x in report.layers], width, label="max"
    )
    _axis(left, positions, labels, "copied tensors: |W - W0| / |W_source|")
    left.legend()
    right.bar(positions, [x.max_zero_rms or 0.0 for x in report.layers], 0.6, color="tab:green")
    _axis(right, positions, labels, "zero-initialised tensors: largest RMS")
    idle = [str(x.index) for x in report.layers if x.verdict != "changed"]
    fig.suptitle("what training did per new layer" + (f" (not changed: {', '.join(idle)})" if idle else ""))
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)


def _axis(ax: Any, positions: list[int], labels: list[str], title: str) -> None:
    ax.set_xticks(positions)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_xlabel("new layer")
    ax.set_title(title, fontsize=10)
