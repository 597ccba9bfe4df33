"""What a batch prediction does with each predicted image: the predictor yields one record per image
(``Prediction``, with its crop) and each output has a writer that consumes it, in input order.

``PredictionTable`` (predictions.csv), ``BatchTally.add`` (the counts and the ISIC rows), ``MaskFiles`` (masks,
crops, the predicted masks scored against the true ones) and ``ReportPictures`` (the report's selection and its
pictures); the truth's labels are scored as the record is made (``record_of``), since its ``correct`` column is part
of the row.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import numpy as np

from dermpipe.data.reading import write_image
from dermpipe.engine.files import output_stem
from dermpipe.predict.predictor import Classifier
from dermpipe.predict.report import ReviewSelection, review_rank
from dermpipe.predict.rows import Prediction, report_row_of
from dermpipe.predict.truth import TruthScorer
from dermpipe.segmentation.prediction import CropResult


class Writer(Protocol):
    def add(self, crop: CropResult, answer: Prediction) -> None: ...


def record_of(
    crop: CropResult, probs: np.ndarray, classes: list[str], refer_threshold: float, truth: TruthScorer
) -> Prediction:
    """One image's record, its label (where the manifest gives one) scored by ``truth`` as it is made."""
    answer = Prediction.of(crop, probs, classes, refer_threshold, truth.model_id, truth.label(crop.image_id))
    return replace(answer, correct=truth.add(crop.image_id, probs, answer.refer))


class PredictionTable:
    """predictions.csv's rows."""

    def __init__(self, writer: csv.DictWriter) -> None:
        self.writer = writer

    def add(self, crop: CropResult, answer: Prediction) -> None:
        self.writer.writerow(answer.csv_row())


class MaskFiles:
    """Each image's full-size mask and crop under ``out`` when asked for, and its mask scored against the true one
    where the manifest gives it."""

    def __init__(self, out: Path, threshold: float, masks: bool, crops: bool, truth: TruthScorer) -> None:
        self.out, self.threshold, self.masks, self.crops, self.truth = out, threshold, masks, crops, truth

    def add(self, crop: CropResult, answer: Prediction) -> None:
        name = output_stem(crop.image_id)  # unique per id: a/x.jpg and b/x.jpg never share an output file
        scored = self.truth.needs_mask(crop.image_id)
        if self.masks or scored:
            full_mask = crop.full_mask(self.threshold)
            if scored:
                self.truth.add_mask(crop.image_id, full_mask)
            if self.masks:
                write_image(self.out / "masks" / f"{name}_segmentation.png", full_mask * 255)
        if self.crops:
            write_image(self.out / "crops" / f"{name}.png", crop.crop)


class ReportPictures:
    """The report's rows while the batch streams: the first ``report_max_images`` in review order
    (``ReviewSelection``), their pictures stored by ``store``; a row pushed out of the selection takes its pictures
    (under ``report_dir``) with it."""

    def __init__(
        self,
        selection: ReviewSelection,
        store: Callable[[str, bytes], str],
        report_dir: Path,
        gradcam_model: Classifier | None,
    ) -> None:
        self.selection, self.store, self.report_dir, self.gradcam_model = selection, store, report_dir, gradcam_model

    def add(self, crop: CropResult, answer: Prediction) -> None:
        if not self.selection.wants(review_rank(answer.refer, answer.correct)):
            return
        evicted = self.selection.add(report_row_of(crop, answer, self.store, self.gradcam_model))
        if evicted is not None:  # pushed out of the first report_max_images: its pictures go too
            for rel in evicted.images.values():
                (self.report_dir / rel).unlink(missing_ok=True)
