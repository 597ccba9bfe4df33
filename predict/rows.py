"""One image's answer: the ``Prediction`` record (a row of predictions.csv, an answer of the API), why an image is
referred, and the report's row."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from dermpipe.data.quality import quality_text
from dermpipe.engine.files import output_stem, write_bytes_atomic
from dermpipe.predict.predictor import Classifier, JudgedCrop
from dermpipe.predict.report import (
    ReportRow,
    thumbnail_jpeg,
)
from dermpipe.segmentation.lesion import FALLBACK_TOO_SMALL, LesionBox
from dermpipe.segmentation.prediction import CropResult

PREDICTION_COLUMNS: tuple[str, ...] = ("predicted", "confidence", "refer", "box", "fallback", "quality")
TRUTH_COLUMNS: tuple[str, ...] = ("truth", "correct", "model")  # always there, so the table's columns never vary


def prediction_columns(classes: Sequence[str]) -> list[str]:
    """The columns of predictions.csv, in order."""
    return ["image_id", "path", *classes, *PREDICTION_COLUMNS, *TRUTH_COLUMNS]


def refer_reason(crop: CropResult, probs: np.ndarray, threshold: float) -> str:
    """Why an image is referred to a dermatologist, or ``""``: an image the models cannot judge (too small, dark,
    blurred, no lesion found) is referred, never confident; so is one unlike the training images (a ``JudgedCrop``'s
    verdict), one whose lesion the U-Net found implausibly small, and one whose top probability is below the
    threshold."""
    reasons = [f"input quality: {quality_text(crop.quality)}"] if crop.quality else []
    if crop.box.fallback == FALLBACK_TOO_SMALL:  # no lesion-like region either: the whole image was classified
        reasons.append(f"no lesion found ({FALLBACK_TOO_SMALL}): the whole image was classified")
    if isinstance(crop, JudgedCrop) and crop.unlike:
        reasons.append(crop.unlike)
    top = float(np.max(probs))
    if top < threshold:
        reasons.append(f"confidence {top:.3f} below the refer threshold {threshold:.3f}")
    return "; ".join(reasons)


@dataclass(frozen=True)
class Prediction:
    """One image's answer: what ``Model.predict`` returns, a row of predictions.csv (``csv_row``) and an answer of the
    served API (``as_json``) are this one record."""

    image_id: str
    path: str
    probabilities: dict[str, float]  # every class the model names, in its order
    predicted: str
    confidence: float  # the predicted class's probability
    refer: bool  # send to a dermatologist: ``refer_reason`` says why
    refer_reason: str
    box: LesionBox  # the lesion's box in the photo's pixels; ``box.fallback`` says why it is the whole image, if so
    quality: tuple[str, ...]  # why the models may not judge this photo well; empty: fine
    model: str  # the model that answered: a bundle's ``name@sha256:...``, or a run folder and its stage digests
    truth: str = ""  # the manifest's label, where it gives one
    correct: bool | None = None  # predicted == truth, where the label is one the model names

    @classmethod
    def of(
        cls,
        crop: CropResult,
        probs: np.ndarray,
        classes: Sequence[str],
        refer_threshold: float,
        model_id: str,
        truth: str = "",
        correct: bool | None = None,
    ) -> Prediction:
        top = int(np.argmax(probs))
        reason = refer_reason(crop, probs, refer_threshold)
        return cls(
            image_id=crop.image_id,
            path=crop.path,
            probabilities={c: float(p) for c, p in zip(classes, probs)},
            predicted=classes[top],
            confidence=float(probs[top]),
            refer=bool(reason),
            refer_reason=reason,
            box=crop.box,
            quality=tuple(crop.quality),
            model=model_id,
            truth=truth,
            correct=correct,
        )

    def csv_row(self) -> dict[str, Any]:
        """The row of predictions.csv (``prediction_columns``), as text."""
        return {
            "image_id": self.image_id,
            "path": self.path,
            **{c: f"{p:.6f}" for c, p in self.probabilities.items()},
            "predicted": self.predicted,
            "confidence": f"{self.confidence:.6f}",
            "refer": int(self.refer),
            "box": self.box.as_text(),
            "fallback": self.box.fallback,
            "quality": quality_text(self.quality),
            "truth": self.truth,
            "correct": "" if self.correct is None else int(self.correct),
            "model": self.model,
        }

    def as_json(self) -> dict[str, Any]:
        """The served API's answer: the CSV row's columns with numbers as numbers, the refer flag as a boolean with
        its reason, the box as ``[x0, y0, x1, y1]`` in the photo's pixels, the quality warnings as a list."""
        box = self.box
        return {
            "image_id": self.image_id,
            "path": self.path,
            **self.probabilities,
            "predicted": self.predicted,
            "confidence": self.confidence,
            "refer": self.refer,
            "box": [int(box.x0), int(box.y0), int(box.x1), int(box.y1)],
            "fallback": box.fallback,
            "quality": list(self.quality),
            "truth": self.truth or None,
            "correct": self.correct,
            "model": self.model,
            "refer_reason": self.refer_reason,
        }


def picture_files(assets: Path, out: Path) -> Callable[[str, bytes], str]:
    """Where the report's pictures go: files under ``assets``, named in the report by their path relative to
    ``out`` (the served page inlines them instead: ``data:`` URIs)."""

    def store(name: str, jpeg: bytes) -> str:
        return write_bytes_atomic(assets / name, jpeg).relative_to(out).as_posix()

    return store


def report_row_of(
    crop: CropResult,
    answer: Prediction,
    store: Callable[[str, bytes], str],
    gradcam_model: Classifier | None,
) -> ReportRow:
    """The report's row of one image's ``answer``: the photo's thumbnail with the lesion contour (kept with the crop,
    never decoded again) and the crop given to ``store`` (a name and JPEG bytes in, what the report shows out:
    ``picture_files``' relative path, or a ``data:`` URI), and the Grad-CAM of the predicted class on
    ``gradcam_model`` when given."""
    stem = output_stem(crop.image_id)
    images = {}
    thumb = crop.photo()
    mask = cv2.resize(crop.probability, thumb.shape[1::-1], interpolation=cv2.INTER_LINEAR) > 127
    images["thumbnail"] = store(f"{stem}_image.jpg", thumbnail_jpeg(thumb, mask))
    images["crop"] = store(f"{stem}_crop.jpg", thumbnail_jpeg(crop.crop))
    if gradcam_model is not None:
        from dermpipe.classification.gradcam import gradcam_overlays

        top = list(answer.probabilities).index(answer.predicted)
        overlay = gradcam_overlays(gradcam_model.model, [crop.crop], [top], gradcam_model.predictor.preprocess_cfg)[0]
        images["gradcam"] = store(f"{stem}_gradcam.jpg", thumbnail_jpeg(overlay))
    return ReportRow(
        answer.image_id,
        dict(answer.probabilities),
        answer.predicted,
        answer.confidence,
        answer.refer,
        answer.box.fallback,
        images,
        answer.quality,
        truth=answer.truth,
        correct=answer.correct,
        refer_reason=answer.refer_reason,
        gradcam_of=gradcam_model.name if gradcam_model is not None else "",
    )
