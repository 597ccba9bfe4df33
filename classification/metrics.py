"""Classification metrics as ranked by ISIC 2018/2019 (balanced accuracy first), confusion matrix and curve plots."""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dermpipe.data.manifest import write_table
from dermpipe.engine.files import atomic_path

logger = logging.getLogger(__name__)


def classification_report(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """Balanced accuracy (mean per-class recall), accuracy, macro F1, per-class precision/recall/specificity/AUC,
    one-vs-rest macro AUC and the confusion matrix (rows = true class, columns = predicted), for argmax predictions.

    Classes absent from ``y_true`` have no recall or AUC: balanced accuracy averages the classes present (as the ISIC
    score does) and the AUCs that cannot be computed are listed under ``auc_skipped``.
    """
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
        roc_auc_score,
    )  # imported when used: a second off every start

    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = len(classes)
    if probs.ndim != 2 or probs.shape != (len(y_true), n_classes):
        raise ValueError(f"probs must be N x {n_classes} for {len(y_true)} labels, got shape {probs.shape}")
    if len(y_true) == 0:
        raise ValueError("no labelled images to score")
    y_pred = probs.argmax(axis=1)
    labels = np.arange(n_classes)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true": expected on small or rare-class sets, and handled as documented.
        warnings.simplefilter("ignore", UserWarning)
        balanced = float(balanced_accuracy_score(y_true, y_pred))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    negatives = cm.sum() - cm.sum(axis=1)  # per class: images of other classes
    false_pos = cm.sum(axis=0) - np.diag(cm)
    per_class: dict[str, dict[str, float | int | None]] = {}
    aucs: list[float] = []
    skipped: list[str] = []
    for c, name in enumerate(classes):
        positive = y_true == c
        auc: float | None = None
        if 0 < positive.sum() < len(y_true):
            auc = float(roc_auc_score(positive, probs[:, c]))
            aucs.append(auc)
        else:
            skipped.append(name)
        present = bool(support[c])
        per_class[name] = {
            "precision": float(precision[c]),
            "recall": float(recall[c]) if present else None,
            "specificity": float((negatives[c] - false_pos[c]) / negatives[c]) if negatives[c] else None,
            "f1": float(f1[c]),
            "auc": auc,
            "support": int(support[c]),
        }
    present_labels = np.unique(np.concatenate([y_true, y_pred]))
    return {
        "balanced_accuracy": balanced,
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=present_labels, average="macro", zero_division=0)),
        "macro_auc": float(np.mean(aucs)) if aucs else None,
        "auc_skipped": skipped,
        "n_images": len(y_true),
        "classes": list(classes),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


def format_report(report: dict[str, Any]) -> str:
    """One line, balanced accuracy first (accuracy alone hides the rare classes)."""
    auc = report.get("macro_auc")
    auc_text = f"{auc:.4f}" if auc is not None else "n/a"
    return (
        f"balanced accuracy {report['balanced_accuracy']:.4f}, accuracy {report['accuracy']:.4f}, "
        f"macro F1 {report['macro_f1']:.4f}, macro AUC {auc_text} ({report['n_images']} images)"
    )


def per_class_table(report: dict[str, Any]) -> str:
    """A small text table of the per-class scores for the log."""
    lines = [f"{'class':<10} {'recall':>7} {'spec':>7} {'prec':>7} {'f1':>7} {'auc':>7} {'n':>6}"]

    def cell(value: float | None) -> str:
        return f"{value:7.3f}" if value is not None and not math.isnan(value) else f"{'-':>7}"

    for name, s in report["per_class"].items():
        lines.append(
            f"{name:<10} {cell(s['recall'])} {cell(s['specificity'])} {cell(s['precision'])} {cell(s['f1'])} "
            f"{cell(s['auc'])} {s['support']:>6}"
        )
    return "\n".join(lines)


def write_confusion_csv(
    matrix: Sequence[Sequence[int]] | np.ndarray,
    classes: Sequence[str],
    path: str | os.PathLike,
    corner: str = "true \\ predicted",
) -> Path:
    """Rows = true class, columns = predicted class, with class names as header and first column (``corner`` heads
    the first column), written atomically."""
    header = [corner, *classes]
    rows = [dict(zip(header, [name, *row])) for name, row in zip(classes, np.asarray(matrix).tolist())]
    return write_table(path, header, rows)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_confusion_png(
    matrix: Sequence[Sequence[int]] | np.ndarray, classes: Sequence[str], path: str | os.PathLike, title: str = ""
) -> Path:
    """The confusion matrix as a heat map, coloured by row-normalised recall, annotated with counts."""
    plt = _pyplot()
    cm = np.asarray(matrix, dtype=np.float64)
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    side = 1.2 + 0.55 * len(classes)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", color="white" if rates[i, j] > 0.5 else "black")
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_learning_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path | None:
    """Loss (train, val) and validation balanced accuracy / accuracy per epoch as a PNG."""
    if not history:
        return None
    plt = _pyplot()
    epochs = [int(r["epoch"]) for r in history]
    fig, (loss_ax, score_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, label in (("train_loss", "train loss"), ("val_loss", "val loss")):
        loss_ax.plot(epochs, [float(r[key]) for r in history], marker="o", label=label)
    loss_ax.set_xlabel("epoch")
    loss_ax.legend()
    for key, label in (
        ("val_balanced_accuracy", "val balanced accuracy"),
        ("val_accuracy", "val accuracy"),
        ("train_balanced_accuracy", "train balanced accuracy"),
    ):
        score_ax.plot(epochs, [float(r[key]) for r in history], marker="o", label=label)
    score_ax.set_xlabel("epoch")
    score_ax.set_ylim(0, 1)
    score_ax.legend()
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path
