"""A batch prediction scored against the truth its manifest carries: each label against the vote, each true lesion mask
against the U-Net's mask.

Labels are scored with the vote's own metrics (``method_metrics``: balanced accuracy first, per-class recall, macro AUC
over the classes present, ...) plus the confusion matrix and what the refer rule does for the refer class (the vote's
``refer_class``, else ``mel``): a referred image is sent to a dermatologist, so a referred image of that class is
caught and a referred image of another class is a false alarm. Masks are scored as the ISIC challenges score them
(``segmentation.metrics``). A label the model cannot name (not among its classes) is counted and named, never scored;
a true mask that cannot be read is a row saying why, never a crash.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dermpipe.classification.metrics import write_confusion_csv, write_confusion_png
from dermpipe.data.manifest import Manifest, write_table
from dermpipe.engine.files import write_text_atomic
from dermpipe.ensemble.calibration import referral_outcome
from dermpipe.ensemble.evaluation import method_metrics
from dermpipe.errors import plain_message
from dermpipe.segmentation.metrics import (
    GREY_THRESHOLD,
    METRICS,
    MaskScoringError,
    image_scores,
    mean_scores,
    read_mask,
)

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
CONFUSION_STEM = "confusion"  # confusion.csv and confusion.png
MASK_SCORES_FILE = "segmentation_scores.csv"
MASK_SCORE_COLUMNS: tuple[str, ...] = ("image_id", *METRICS, "missing")  # missing: why the row has no scores
# Every file this module may write into the output folder: a run removes them first, so none outlives its input.
TRUTH_OUTPUTS: tuple[str, ...] = (METRICS_FILE, f"{CONFUSION_STEM}.csv", f"{CONFUSION_STEM}.png", MASK_SCORES_FILE)
FALLBACK_REFER_CLASS = "mel"
_SHOWN = 5  # how many unreadable masks a log line names


def refer_class_of(meta: Mapping[str, Any], classes: Sequence[str]) -> str | None:
    """The class whose sensitivity the refer rule protects: the vote's ``refer_class`` (its metadata), else ``mel``
    when the model has that class, else ``None``."""
    recorded = str(meta.get("refer_class") or "")
    if recorded in classes:
        return recorded
    return FALLBACK_REFER_CLASS if FALLBACK_REFER_CLASS in classes else None


def _json_safe(value: Any) -> Any:
    """NaN and infinities as ``null`` (strict JSON has neither), numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _rate(hits: np.ndarray) -> float | None:
    return float(hits.mean()) if hits.size else None


def refer_scores(
    probs: np.ndarray, labels: np.ndarray, referred: np.ndarray, class_index: int, threshold: float
) -> dict[str, Any]:
    """Sensitivity and specificity of one class when a referred image goes to a dermatologist.

    ``referred`` is what the run decided per image (top probability below ``threshold``, or an input the models cannot
    judge): an image of the class is caught when it is predicted as the class or referred; an image of another class
    is a true negative when it is neither. ``sensitivity_threshold_only`` is the threshold rule alone, as the vote
    chose the threshold on its held-out images (``referral_outcome``).
    """
    positive = labels == class_index
    flagged = (probs.argmax(axis=1) == class_index) | referred
    outcome = referral_outcome(probs, labels, class_index, threshold)
    return {
        "threshold": float(threshold),
        "positives": int(positive.sum()),
        "negatives": int((~positive).sum()),
        "referred": int(referred.sum()),
        "sensitivity": _rate(flagged[positive]),
        "specificity": _rate(~flagged[~positive]),
        "sensitivity_without_referral": outcome["sensitivity_without_referral"],
        "sensitivity_threshold_only": outcome["sensitivity_with_referral"],
    }


def label_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    referred: np.ndarray,
    classes: Sequence[str],
    refer_class: str | None,
    threshold: float,
) -> dict[str, Any]:
    """The scores of ``probs`` (images x classes) against class indices ``labels`` (at least one image)."""
    from sklearn.metrics import confusion_matrix  # scikit-learn imported when used: a second off every start

    scores = method_metrics(labels, probs, classes)
    matrix = confusion_matrix(labels, probs.argmax(axis=1), labels=list(range(len(classes))))
    out: dict[str, Any] = {
        "balanced_accuracy": scores["balanced_accuracy"],
        "accuracy": scores["accuracy"],
        "macro_auc": scores["macro_auc"],
        "macro_f1": scores["macro_f1"],
        "log_loss": scores["log_loss"],
        "ece": scores["ece"],
        "recall": {c: scores[f"recall_{c}"] for c in classes},
        "auc": {c: scores[f"auc_{c}"] for c in classes},
        "support": {c: int(n) for c, n in zip(classes, matrix.sum(axis=1))},
        "confusion_matrix": matrix.tolist(),  # rows: true class, columns: predicted class, in the order of "classes"
    }
    out["refer"] = None
    if refer_class is not None:
        index = list(classes).index(refer_class)
        out["refer"] = {"class": refer_class, **refer_scores(probs, labels, referred, index, threshold)}
    return out


class TruthScorer:
    """Collects, image by image as a batch prediction streams, what the manifest says each image truly is, and writes
    ``metrics.json``, ``confusion.csv``/``.png`` and ``segmentation_scores.csv`` at the end."""

    def __init__(
        self,
        manifest: Manifest,
        classes: Sequence[str],
        refer_class: str | None,
        refer_threshold: float,
        mask_threshold: float,
        model_id: str = "",
    ) -> None:
        self.classes = list(classes)
        self.refer_class = refer_class
        self.refer_threshold = float(refer_threshold)
        self.mask_threshold = float(mask_threshold)
        self.model_id = model_id
        self._index = {c: i for i, c in enumerate(self.classes)}
        self._labels = {r["image_id"]: r.get("label", "") or "" for r in manifest.rows}
        self._masks = {r["image_id"]: r.get("mask_path", "") or "" for r in manifest.rows}
        self.images = 0  # predicted images seen
        self.labelled = 0  # of them, with a label
        self.outside: Counter[str] = Counter()  # labels the model cannot name, and how many images carry each
        self._scored_labels: list[int] = []
        self._scored_probs: list[np.ndarray] = []
        self._scored_refer: list[bool] = []
        self.mask_rows: list[dict[str, str]] = []
        self._mask_scores: list[dict[str, float]] = []

    def label(self, image_id: str) -> str:
        """The image's true class as the manifest gives it, or ``""``."""
        return self._labels.get(image_id, "")

    def needs_mask(self, image_id: str) -> bool:
        """Whether the manifest gives a true mask for the image (so its predicted mask is to be scored)."""
        return bool(self._masks.get(image_id))

    def add(self, image_id: str, probs: np.ndarray, refer: bool) -> bool | None:
        """Record one predicted image; whether its prediction is right (``None`` without a label). A label the model
        cannot name is wrong and left out of the scores."""
        self.images += 1
        label = self.label(image_id)
        if not label:
            return None
        self.labelled += 1
        index = self._index.get(label)
        if index is None:
            self.outside[label] += 1
            return False
        self._scored_labels.append(index)
        self._scored_probs.append(np.asarray(probs, dtype=np.float64))
        self._scored_refer.append(bool(refer))
        return int(np.argmax(probs)) == index

    def add_mask(self, image_id: str, predicted: np.ndarray) -> dict[str, float] | None:
        """Score the predicted full-size mask (0/1) against the image's true mask; ``None`` (and a row saying why)
        when the true mask is missing, unreadable or of another size than the image."""
        path = Path(self._masks[image_id])
        scores: dict[str, float] | None = None
        try:
            if not path.is_file():
                raise MaskScoringError(f"true mask {path} not found")
            truth = read_mask(path)
            if truth.shape != predicted.shape:
                raise MaskScoringError(
                    f"true mask {path} is {truth.shape[1]}x{truth.shape[0]} (WxH) but the image is "
                    f"{predicted.shape[1]}x{predicted.shape[0]}"
                )
            scores = image_scores(predicted.astype(bool), truth > GREY_THRESHOLD)
        except (MaskScoringError, OSError) as error:
            self.mask_rows.append({"image_id": image_id, **dict.fromkeys(METRICS, ""), "missing": plain_message(error)})
            return None
        self._mask_scores.append(scores)
        self.mask_rows.append({"image_id": image_id, **{m: f"{scores[m]:.6f}" for m in METRICS}, "missing": ""})
        return scores

    def state(self) -> dict[str, Any]:
        """What this scorer has collected, as JSON (a shard's part of the truth scores): ``add_state`` of the parts'
        states, in input order, collects what one scorer over every image does."""
        return {
            "images": self.images,
            "labelled": self.labelled,
            "outside": dict(self.outside),
            "labels": list(self._scored_labels),
            "probs": [p.tolist() for p in self._scored_probs],  # float64 as JSON: the same numbers read back
            "refer": list(self._scored_refer),
            "mask_rows": list(self.mask_rows),
            "mask_scores": [{k: float(v) for k, v in s.items()} for s in self._mask_scores],
        }

    def add_state(self, state: Mapping[str, Any]) -> None:
        """Add what another scorer collected (its ``state``) after what this one holds."""
        self.images += int(state["images"])
        self.labelled += int(state["labelled"])
        self.outside.update({str(k): int(v) for k, v in state["outside"].items()})
        self._scored_labels.extend(int(i) for i in state["labels"])
        self._scored_probs.extend(np.asarray(p, dtype=np.float64) for p in state["probs"])
        self._scored_refer.extend(bool(r) for r in state["refer"])
        self.mask_rows.extend(dict(r) for r in state["mask_rows"])
        self._mask_scores.extend(dict(s) for s in state["mask_scores"])

    @property
    def scored(self) -> int:
        return len(self._scored_labels)

    @property
    def masks_scored(self) -> int:
        return len(self._mask_scores)

    @property
    def any_truth(self) -> bool:
        return bool(self.labelled or self.mask_rows)

    def metrics(self) -> dict[str, Any]:
        """What ``metrics.json`` holds (see ``write``)."""
        out: dict[str, Any] = {
            "model": self.model_id,
            "classes": self.classes,
            "images": self.images,
            "labelled": self.labelled,
            "scored": self.scored,
            "labels_outside_classes": dict(sorted(self.outside.items())),
        }
        if self.scored:
            labels = np.asarray(self._scored_labels, dtype=np.int64)
            probs = np.stack(self._scored_probs)
            referred = np.asarray(self._scored_refer, dtype=bool)
            out.update(label_metrics(labels, probs, referred, self.classes, self.refer_class, self.refer_threshold))
        if self.mask_rows:
            segmentation: dict[str, Any] = {
                "threshold": self.mask_threshold,
                "scored": self.masks_scored,
                "missing": len(self.mask_rows) - self.masks_scored,
            }
            if self._mask_scores:
                segmentation.update(mean_scores(self._mask_scores))
            out["segmentation"] = segmentation
        return _json_safe(out)

    def write(self, out: Path) -> dict[str, Any] | None:
        """Write the truth outputs into ``out`` and log what they say; ``None`` (and nothing written) when no predicted
        image had a label or a true mask.

        ``metrics.json``: ``images, labelled, scored, labels_outside_classes`` and, with scored labels,
        ``balanced_accuracy, accuracy, macro_auc, macro_f1, log_loss, ece, recall, auc, support, confusion_matrix``
        and ``refer``; with true masks ``segmentation`` (the means over the masks scored). ``confusion.csv`` and
        ``confusion.png`` with scored labels, ``segmentation_scores.csv`` with true masks.
        """
        if not self.any_truth:
            return None
        metrics = self.metrics()
        if self.outside:
            named = ", ".join(f"{label!r} ({n})" for label, n in sorted(self.outside.items()))
            logger.warning(
                "%d labelled images have a label the model cannot name (its classes: %s): %s; not scored",
                sum(self.outside.values()),
                ", ".join(self.classes),
                named,
            )
        if self.scored:
            matrix = metrics["confusion_matrix"]
            write_confusion_csv(matrix, self.classes, out / f"{CONFUSION_STEM}.csv", corner="true\\predicted")
            title = f"{self.scored} images" + (f", {self.model_id}" if self.model_id else "")
            write_confusion_png(matrix, self.classes, out / f"{CONFUSION_STEM}.png", title)
            refer = metrics["refer"]
            logger.info(
                "scored %d labelled images: balanced accuracy %.4f, accuracy %.4f%s",
                self.scored,
                metrics["balanced_accuracy"],
                metrics["accuracy"],
                ""
                if refer is None
                else f"; {refer['class']} sensitivity {_text(refer['sensitivity'])}, specificity "
                f"{_text(refer['specificity'])} (referred images counted as sent to a dermatologist)",
            )
        if self.mask_rows:
            write_table(out / MASK_SCORES_FILE, MASK_SCORE_COLUMNS, self.mask_rows)
            missing = [r for r in self.mask_rows if r["missing"]]
            if missing:
                shown = "; ".join(f"{r['image_id']}: {r['missing']}" for r in missing[:_SHOWN])
                logger.warning(
                    "%d of %d true masks not scored (see %s): %s%s",
                    len(missing),
                    len(self.mask_rows),
                    MASK_SCORES_FILE,
                    shown,
                    "; ..." if len(missing) > _SHOWN else "",
                )
            if self._mask_scores:
                logger.info("scored %d masks: mean Jaccard %.4f", self.masks_scored, metrics["segmentation"]["jaccard"])
        write_text_atomic(out / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
        return metrics


def _text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
