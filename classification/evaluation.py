"""Scoring a classifier: training and validation scorers for the engine's loop, and the per-split report files."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score

from dermpipe.classification.metrics import classification_report, write_confusion_csv, write_confusion_png
from dermpipe.engine.files import write_text_atomic


class TrainScorer:
    """Balanced accuracy of the training batches' predicted classes (as the network saw them, augmented)."""

    def __init__(self) -> None:
        self.predicted: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.predicted.append(logits.argmax(1))
        self.targets.append(targets)

    def compute(self) -> dict[str, float]:
        y_pred = torch.cat(self.predicted).cpu().numpy()
        y_true = torch.cat(self.targets).cpu().numpy()
        return {"train_balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred))}


class ProbabilityScorer:
    """Softmax probabilities and labels over batches; rows labelled -1 count for neither loss nor score.

    The loss is plain (unweighted, unsmoothed) cross-entropy, comparable across runs with other loss settings.
    """

    def __init__(self, classes: Sequence[str]) -> None:
        self.classes = list(classes)
        self.probs: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.probs.append(torch.softmax(logits.float(), dim=1).cpu())
        self.labels.append(targets.cpu())

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        p = torch.cat(self.probs).numpy() if self.probs else np.zeros((0, len(self.classes)), dtype=np.float32)
        y = torch.cat(self.labels).numpy() if self.labels else np.zeros(0, dtype=np.int64)
        return p, y

    def compute(self) -> dict[str, Any]:
        p, y = self.arrays()
        known = y >= 0
        loss = float(-np.log(np.clip(p[known, y[known]], 1e-12, None)).mean()) if known.any() else float("nan")
        report = classification_report(y[known], p[known], self.classes)
        return {
            "val_loss": loss,
            "val_balanced_accuracy": report["balanced_accuracy"],
            "val_accuracy": report["accuracy"],
            "val_macro_f1": report["macro_f1"],
            "val_macro_auc": report["macro_auc"] if report["macro_auc"] is not None else float("nan"),
        }


def save_report(report: dict[str, Any], run_dir: Path, name: str, classes: Sequence[str]) -> None:
    """``metrics_<name>.json``, ``confusion_<name>.csv`` and ``confusion_<name>.png`` in ``run_dir``."""
    write_text_atomic(run_dir / f"metrics_{name}.json", json.dumps(report, indent=1) + "\n")
    write_confusion_csv(report["confusion_matrix"], classes, run_dir / f"confusion_{name}.csv")
    write_confusion_png(report["confusion_matrix"], classes, run_dir / f"confusion_{name}.png", title=name)
