"""Scores of the vote's methods on the test images: ISIC-style metrics and paired bootstrap intervals."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from dermpipe.ensemble.calibration import expected_calibration_error

logger = logging.getLogger(__name__)

METRIC_COLUMNS: tuple[str, ...] = ("balanced_accuracy", "macro_auc", "macro_f1", "accuracy", "log_loss", "ece")
INTERVAL_COLUMNS: tuple[str, ...] = (
    "balanced_accuracy_low",
    "balanced_accuracy_high",
    "delta_vs_best_single",
    "delta_low",
    "delta_high",
    "p_better_than_best_single",
)


def method_metrics(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str], n_bins: int = 15) -> dict[str, float]:
    """ISIC-style scores of (images, classes) probabilities: balanced accuracy (mean per-class recall), macro
    one-vs-rest AUC over the classes present, macro F1, accuracy, log-loss, ECE, and per-class recall and AUC.
    """
    from sklearn.metrics import (
        f1_score,
        log_loss,
        roc_auc_score,
    )  # scikit-learn imported when used: a second off every start

    probs = probs / probs.sum(axis=1, keepdims=True)
    predicted = probs.argmax(axis=1)
    recalls, aucs = {}, {}
    for c, name in enumerate(classes):
        positive = labels == c
        recalls[name] = float((predicted[positive] == c).mean()) if positive.any() else float("nan")
        both = positive.any() and (~positive).any()
        aucs[name] = float(roc_auc_score(positive, probs[:, c])) if both else float("nan")
    present = [r for r in recalls.values() if not np.isnan(r)]
    scored_aucs = [a for a in aucs.values() if not np.isnan(a)]
    out = {
        "balanced_accuracy": float(np.mean(present)),
        "macro_auc": float(np.mean(scored_aucs)) if scored_aucs else float("nan"),
        "macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
        "accuracy": float((predicted == labels).mean()),
        "log_loss": float(log_loss(labels, np.clip(probs, 1e-12, 1.0), labels=list(range(len(classes))))),
        "ece": expected_calibration_error(probs, labels, n_bins),
    }
    out.update({f"recall_{name}": r for name, r in recalls.items()})
    out.update({f"auc_{name}": a for name, a in aucs.items()})
    return out


def bootstrap_balanced_accuracy(
    labels: np.ndarray,
    predictions: dict[str, np.ndarray],
    reference: str,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Paired, class-stratified bootstrap of balanced accuracy on the same test images.

    Each resample draws images with replacement inside every true class (class sizes stay fixed, as balanced accuracy
    weighs every class equally), and every method is scored on the same resample, so the interval of a method's
    difference to ``reference`` accounts for their shared images. Returns per method the percentile interval of its
    balanced accuracy, its point difference to the reference with the interval of that difference, and the share of
    resamples in which it scored above the reference.
    """
    names = list(predictions)
    correct = np.stack([np.asarray(predictions[n]) == labels for n in names])  # methods x images
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    rng = np.random.default_rng(seed)
    scores = np.empty((samples, len(names)))
    for i in range(samples):
        recalls = [correct[:, rng.choice(m, size=m.size)].mean(axis=1) for m in members]
        scores[i] = np.mean(recalls, axis=0)
    point = np.mean([correct[:, m].mean(axis=1) for m in members], axis=0)
    ref = names.index(reference)
    diff = scores - scores[:, [ref]]
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(scores, [tail, 1.0 - tail], axis=0)
    diff_low, diff_high = np.quantile(diff, [tail, 1.0 - tail], axis=0)
    return {
        name: dict(
            zip(
                INTERVAL_COLUMNS,
                (
                    float(low[j]),
                    float(high[j]),
                    float(point[j] - point[ref]),
                    float(diff_low[j]),
                    float(diff_high[j]),
                    float((diff[:, j] > 0).mean()),
                ),
            )
        )
        for j, name in enumerate(names)
    }
