"""PNG curves of a run's ``metrics.jsonl``: loss, accuracy and acceptance per TTT step, and
``staleness.png`` (draft lag mean/max, drops by reason) when the run tracked staleness.

Drawn with matplotlib's Agg backend (no display needed); written at the end of a run and on
demand (``write_plots(run_dir)``, e.g. while a run is still going).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dataflow.contracts import NotFoundError
from dataflow.train.metrics import read_jsonl

PLOTS = {
    "loss": ("train/ploss_", "loss (per TTT step)", "train/loss"),
    "accuracy": ("train/acc_", "accuracy (per TTT step)", "train/acc"),
    "acceptance": (
        "train/acceptance_rate_",
        "acceptance rate (per TTT step)",
        "train/acceptance_rate",
    ),
}
"""name → (per-step metric prefix, title, overall metric)."""


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, int | float):
            steps.append(int(row["step"]))
            values.append(float(value))
    return steps, values


def _ttt_keys(rows: Sequence[Mapping[str, Any]], prefix: str) -> list[str]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)$")
    found = {key for row in rows for key in row if pattern.match(key)}
    return sorted(found, key=lambda k: int(pattern.match(k).group(1)))  # type: ignore[union-attr]


def write_plots(metrics_path: Path, out_dir: Path) -> list[Path]:
    """Draw ``loss.png``, ``accuracy.png`` and ``acceptance.png`` into ``out_dir``.

    Each has one line per TTT step (``k = 0 .. ttt_length-1``) plus the overall value, against
    the optimizer step. Returns the written paths; ``NotFoundError`` when there are no metrics.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.is_file():
        raise NotFoundError(f"{metrics_path} does not exist: no metrics to plot")
    rows = read_jsonl(metrics_path)
    if not rows:
        raise NotFoundError(f"{metrics_path} holds no metrics yet")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (prefix, title, overall) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
        keys = _ttt_keys(rows, prefix)
        cmap = plt.get_cmap("viridis", max(len(keys), 1))
        for index, key in enumerate(keys):
            steps, values = _series(rows, key)
            ax.plot(
                steps, values, color=cmap(index), linewidth=1.2, label=f"k={key[len(prefix) :]}"
            )
        steps, values = _series(rows, overall)
        if values:
            ax.plot(steps, values, color="black", linewidth=2.0, linestyle="--", label="overall")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        tmp = out_dir / f".{name}.tmp.png"
        fig.savefig(tmp)
        plt.close(fig)
        tmp.replace(path)
        written.append(path)
    if any("staleness/draft_lag_mean" in row for row in rows):
        written.append(_staleness_plot(plt, rows, out_dir))
    return written


def _staleness_plot(plt: Any, rows: Sequence[Mapping[str, Any]], out_dir: Path) -> Path:
    """``staleness.png``: rolling draft lag (mean, max) and cumulative drops per reason."""
    fig, (lag, drops) = plt.subplots(2, 1, figsize=(7, 6), dpi=100, sharex=True)
    for key, style in (("staleness/draft_lag_mean", "-"), ("staleness/draft_lag_max", "--")):
        steps, values = _series(rows, key)
        lag.plot(steps, values, linestyle=style, label=key.rsplit("/", 1)[-1])
    lag.set_title("draft lag of samples reaching the trainer (versions)")
    reasons = sorted({k for row in rows for k in row if k.startswith("staleness/dropped/")})
    for key in ["staleness/dropped", *reasons]:
        steps, values = _series(rows, key)
        drops.plot(steps, values, label=key.removeprefix("staleness/"))
    drops.set_title("samples dropped (cumulative)")
    drops.set_xlabel("optimizer step")
    for ax in (lag, drops):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "staleness.png"
    tmp = out_dir / ".staleness.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
