"""The vote's files: the methods table and its forest plot, the meta-network's confusion matrix and the per-image
test predictions."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix

from dermpipe.classification.metrics import write_confusion_csv, write_confusion_png
from dermpipe.data.manifest import write_table
from dermpipe.engine.files import atomic_path
from dermpipe.ensemble.evaluation import INTERVAL_COLUMNS, METRIC_COLUMNS
from dermpipe.ensemble.stacked_tables import StackedTable

logger = logging.getLogger(__name__)


def _format_cell(value: Any) -> Any:
    """A float as six decimals (the precision of every number the vote writes to CSV); anything else as is."""
    return f"{value:.6f}" if isinstance(value, float) else value


def write_methods_table(path: Path, rows: Sequence[dict[str, Any]], classes: Sequence[str]) -> Path:
    """``method, balanced_accuracy, macro_auc, macro_f1, accuracy, log_loss, ece``, the bootstrap interval columns
    when computed, ``recall_<class>..., auc_<class>..., detail``: one row per method, all on the same test images."""
    intervals = [c for c in INTERVAL_COLUMNS if any(c in row for row in rows)]
    header = ["method", *METRIC_COLUMNS, *intervals, *(f"recall_{c}" for c in classes), *(f"auc_{c}" for c in classes)]
    header.append("detail")
    return write_table(path, header, [{h: _format_cell(row.get(h, "")) for h in header} for row in rows])


@dataclass(frozen=True)
class MethodsPlot:
    """What ``methods.png`` draws, one entry per method in the table's order (top to bottom)."""

    methods: tuple[str, ...]
    balanced_accuracy: tuple[float, ...]  # the points
    low: tuple[float, ...] | None  # the bootstrap interval (the bars); None without one (evaluation.bootstrap=0)
    high: tuple[float, ...] | None
    reference: float  # the vertical line: the best single backbone's balanced accuracy (the ``best_single`` row)
    best_single: str  # the backbone that row stands for, named in the legend


def _number(value: Any) -> float:
    """A table cell as the number methods.csv holds (six decimals), whether given as a float or as the CSV's text."""
    return float("nan") if value is None or value == "" else float(_format_cell(float(value)))


def methods_plot_data(rows: Sequence[Mapping[str, Any]], best_single: str) -> MethodsPlot:
    """The forest plot's values from the methods table's rows, at the CSV's precision: the vote's own rows (floats) and
    methods.csv's read back (strings) give the same. The reference is the ``best_single`` row's balanced accuracy
    (else the row of the backbone ``best_single`` names)."""
    if not rows:
        raise ValueError("no methods to plot")
    by_name = {str(r["method"]): r for r in rows}
    ref_row = by_name.get("best_single", by_name.get(best_single))
    if ref_row is None:
        raise ValueError(f"neither a best_single row nor one of {best_single!r} among the methods {list(by_name)}")
    has_interval = any(r.get("balanced_accuracy_low") not in (None, "") for r in rows)
    return MethodsPlot(
        methods=tuple(str(r["method"]) for r in rows),
        balanced_accuracy=tuple(_number(r["balanced_accuracy"]) for r in rows),
        low=tuple(_number(r.get("balanced_accuracy_low")) for r in rows) if has_interval else None,
        high=tuple(_number(r.get("balanced_accuracy_high")) for r in rows) if has_interval else None,
        reference=_number(ref_row["balanced_accuracy"]),
        best_single=best_single,
    )


def write_methods_plot(
    path: Path,
    rows: Sequence[Mapping[str, Any]],
    best_single: str,
    confidence: float | None = None,
    title: str = "The vote's methods on the test split",
) -> Path:
    """A forest plot of the methods table: per method (one row each) its balanced accuracy as a point and its
    bootstrap interval as a bar (points alone without intervals), a dashed line at the best single backbone's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = methods_plot_data(rows, best_single)
    y = list(range(len(data.methods)))
    fig, ax = plt.subplots(figsize=(7.5, 1.6 + 0.32 * len(y)), layout="constrained")
    if data.low is not None and data.high is not None:
        what = f"{confidence:.0%} bootstrap interval" if confidence else "bootstrap interval"
        ax.hlines(y, data.low, data.high, color="tab:blue", lw=2, alpha=0.6, label=what)
    ax.plot(data.balanced_accuracy, y, "o", color="tab:blue", zorder=3, label="balanced accuracy")
    ax.axvline(
        data.reference, color="grey", ls="--", lw=1, label=f"best single backbone: {best_single} ({data.reference:.3f})"
    )
    for i, value in enumerate(data.balanced_accuracy):
        text = f"{value:.3f}"
        if data.low is not None and data.high is not None and not math.isnan(data.low[i]):
            text += f" [{data.low[i]:.3f}, {data.high[i]:.3f}]"
        ax.annotate(text, (1.0, i), xycoords=("axes fraction", "data"), xytext=(6, 0), textcoords="offset points",
                    va="center", fontsize=8)  # fmt: skip
    ax.set_yticks(y, data.methods)
    ax.set_ylim(len(y) - 0.5, -0.5)  # the table's first row on top
    ax.set_xlabel("balanced accuracy (test split)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    ax.margins(x=0.08)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return Path(path)


def write_confusion_matrix(
    labels: np.ndarray, predicted: np.ndarray, classes: Sequence[str], stem: Path, title: str = ""
) -> Path:
    """``<stem>.csv`` (rows true class, columns predicted) and ``<stem>.png``; returns the CSV's path."""
    matrix = confusion_matrix(labels, predicted, labels=list(range(len(classes))))
    csv_path = write_confusion_csv(matrix, classes, stem.with_suffix(".csv"), corner="true\\predicted")
    write_confusion_png(matrix, classes, stem.with_suffix(".png"), title=title)
    return csv_path


def write_predictions(path: Path, table: StackedTable, probs: np.ndarray, threshold: float) -> Path:
    """Every test image (labelled or not): calibrated meta-network probabilities, top class, and the refer flag."""
    header = ["image_id", "crop_key", "label", "predicted", "top_probability", "refer", *table.classes]
    rows = []
    for i, image_id in enumerate(table.ids):
        top = float(probs[i].max())
        label = table.classes[table.labels[i]] if table.labels[i] >= 0 else ""
        cells = [
            image_id,
            table.crop_keys[i],
            label,
            table.classes[int(probs[i].argmax())],
            f"{top:.6f}",
            int(top < threshold),
            *(f"{p:.6f}" for p in probs[i]),
        ]
        rows.append(dict(zip(header, cells)))
    return write_table(path, header, rows)
