"""The vote's files: the methods table, the meta-network's confusion matrix and the per-image test predictions."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix

from dermpipe.classification.metrics import write_confusion_csv, write_confusion_png
from dermpipe.data.manifest import write_table
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
