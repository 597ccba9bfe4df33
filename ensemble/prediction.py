"""Batch prediction: a folder of photos -> lesion crops -> five classifiers -> meta-network vote -> one row per image.

Streams in chunks, so memory stays flat over any number of images; every stage goes through the cache, so a rerun
after adding ten images computes ten. When the manifest gives the truth (labels, lesion masks), the predictions are
scored against it as they stream (``dermpipe.ensemble.truth``).
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from dermpipe.classification.backbones import load_classifier
from dermpipe.classification.config import ClassificationConfig
from dermpipe.classification.prediction import STAGE, CropProbabilities
from dermpipe.configs.loader import load_config
from dermpipe.data.manifest import Manifest, write_table
from dermpipe.data.preprocess import PreprocessConfig
from dermpipe.data.quality import quality_text
from dermpipe.data.reading import read_image, write_image
from dermpipe.engine.cache import StageCache
from dermpipe.engine.checkpoint import CheckpointError, check_trained_setting, weights_digest
from dermpipe.engine.files import atomic_path, output_stem, remove_stale_temporaries
from dermpipe.engine.run import check_run_folder
from dermpipe.ensemble.calibration import apply_temperature
from dermpipe.ensemble.config import PredictConfig
from dermpipe.ensemble.meta import load_meta, meta_logits
from dermpipe.ensemble.report import ReportRow, ReviewSelection, review_rank, save_thumbnail, write_report
from dermpipe.ensemble.truth import TRUTH_OUTPUTS, TruthScorer, refer_class_of
from dermpipe.segmentation.config import SegmentationConfig
from dermpipe.segmentation.prediction import CROP_SETTINGS, CropResult, SegmentationPredictor, SkipLog

logger = logging.getLogger(__name__)


class Classifier:
    """One trained backbone and its per-crop probability cache (shared with the training run's tables)."""

    def __init__(
        self, backbone_dir: Path, device: torch.device, tta: bool, cache_root: Path, force: bool, batch_size: int
    ) -> None:
        path = backbone_dir / "best.safetensors"
        check_run_folder(backbone_dir, "classification")
        if not path.is_file():
            raise CheckpointError(
                f"backbone {backbone_dir.name} is not trained: {path} not found; train it with `python "
                f"classification/train.py --backbone {backbone_dir.name} --root ROOT`, or pass --classification-root "
                "FOLDER (the folder of backbone runs)"
            )
        self.model, self.meta = load_classifier(path, device)
        self.name = backbone_dir.name
        self.predictor = CropProbabilities(
            self.model,
            weights_digest(path),
            StageCache(cache_root, STAGE, force=force),
            tta=tta,
            preprocess_cfg=_trained_preprocess(self.meta, backbone_dir, path),
            batch_size=batch_size,
            device=device,
        )
        self.cache = self.predictor.cache

    def probabilities(self, crops: Sequence[CropResult]) -> np.ndarray:
        return self.predictor([c.crop_key for c in crops], lambda i: crops[i].crop, desc=self.name)


def _trained_preprocess(meta: dict[str, Any], backbone_dir: Path, path: Path) -> PreprocessConfig | None:
    """The preprocessing the backbone was trained with, from its checkpoint (older checkpoints: its config.yaml).

    A run config.yaml that disagrees with the checkpoint (input size or preprocessing) is refused, naming both.
    """
    cfg_path = backbone_dir / "config.yaml"
    cfg = load_config(ClassificationConfig, cfg_path) if cfg_path.is_file() else None
    if not isinstance(meta.get("preprocess"), dict):
        return cfg.data.preprocess if cfg is not None else None
    trained = PreprocessConfig(**meta["preprocess"])
    if cfg is not None:
        check_trained_setting(path, "data.preprocess", asdict(trained), asdict(cfg.data.preprocess))
        if cfg.data.image_size:
            check_trained_setting(path, "data.image_size", int(meta["input_size"]), cfg.data.image_size)
    return trained


def agreed_crop_settings(classifiers: Sequence[Classifier]) -> dict[str, Any] | None:
    """The crop settings every backbone was trained with (recorded in their checkpoints), or ``None`` when none
    recorded any; backbones trained on crops made differently are refused."""
    recorded = [(c.name, c.meta["crops"]) for c in classifiers if isinstance(c.meta.get("crops"), dict)]
    if not recorded:
        return None
    first_name, first = recorded[0]
    for name, crops in recorded[1:]:
        for key in (*CROP_SETTINGS, "preprocess"):
            if crops.get(key) != first.get(key):
                raise CheckpointError(
                    f"backbones {first_name} and {name} were trained on crops made with {key}={first.get(key)!r} "
                    f"and {crops.get(key)!r}: retrain one of them on the same crops"
                )
    return dict(first)


class EnsemblePredictor:
    """Every trained stage loaded once: the U-Net, the backbones in the meta-network's order, the vote."""

    def __init__(self, cfg: PredictConfig, device: torch.device) -> None:
        self.cfg = cfg
        cache = Path(cfg.run.cache_dir)
        self.meta_model, self.meta = load_meta(Path(cfg.ensemble_run) / "meta.safetensors")
        self.classes: list[str] = list(self.meta["classes"])
        self.backbones: list[str] = list(self.meta["backbones"])
        root = Path(cfg.classification_root)
        self.classifiers = [
            Classifier(root / b, device, cfg.tta, cache, cfg.run.force, cfg.batch_size) for b in self.backbones
        ]
        for c in self.classifiers:
            if list(c.meta["classes"]) != self.classes:
                raise CheckpointError(
                    f"backbone {c.name} was trained on classes {c.meta['classes']}, the vote on {self.classes}: "
                    "retrain the vote with `python ensemble/vote.py`"
                )
        seg_run = Path(cfg.segmentation_run)
        seg_cfg_path = seg_run / "config.yaml"
        seg_cfg = load_config(SegmentationConfig, seg_cfg_path) if seg_cfg_path.is_file() else SegmentationConfig()
        crops = agreed_crop_settings(self.classifiers)  # crop as the classifiers' training crops were made
        self.segmenter = SegmentationPredictor(
            seg_run / "best.safetensors", seg_cfg, device, cache, cfg.run.force, crops, strict=seg_cfg_path.is_file()
        )
        if crops and crops.get("segmentation_weights") not in (None, self.segmenter.weights):
            logger.warning(
                "the backbones were trained on crops of another U-Net than %s: predictions may be off",
                seg_run / "best.safetensors",
            )
        self.temperature = float(self.meta.get("temperature") or 1.0)
        self.refer_threshold = float(self.meta.get("refer_threshold") or 0.0) if cfg.refer else 0.0
        # the class whose sensitivity the refer threshold protects (the vote's metadata, else mel when there is one)
        self.refer_class = refer_class_of(self.meta, self.classes)

    def vote(self, crops: Sequence[CropResult]) -> tuple[np.ndarray, np.ndarray]:
        """(stacked N x B x C backbone probabilities, final N x C probabilities)."""
        stacked = np.stack([c.probabilities(crops) for c in self.classifiers], axis=1)
        logits = meta_logits(self.meta_model, stacked)
        return stacked, apply_temperature(logits, self.temperature)

    def predict(self, items: Sequence[tuple[str, str]], skipped: SkipLog) -> Iterator[tuple[CropResult, np.ndarray]]:
        """Stream ``(crop result, final probabilities)`` per image in chunks of ``batch_size``; an image that cannot be
        read is recorded in ``skipped``."""
        chunk: list[CropResult] = []
        for result in skipped.passed(self.segmenter.crop(items)):
            chunk.append(result)
            if len(chunk) >= self.cfg.batch_size:
                yield from zip(chunk, self.vote(chunk)[1])
                chunk = []
        if chunk:
            yield from zip(chunk, self.vote(chunk)[1])

    def cache_summary(self) -> str:
        caches = [self.segmenter.cache] + [c.cache for c in self.classifiers]
        return f"cache: {sum(c.reused for c in caches)} reused, {sum(c.computed for c in caches)} computed"


PREDICTION_COLUMNS: tuple[str, ...] = ("predicted", "confidence", "refer", "box", "fallback", "quality")
TRUTH_COLUMNS: tuple[str, ...] = ("truth", "correct", "model")  # always there, so the table's columns never vary


def prediction_columns(classes: Sequence[str]) -> list[str]:
    """The columns of predictions.csv, in order."""
    return ["image_id", "path", *classes, *PREDICTION_COLUMNS, *TRUTH_COLUMNS]


def predict_folder(
    manifest: Manifest,
    predictor: EnsemblePredictor,
    output: str | os.PathLike,
    out_dir: str | os.PathLike,
    excluded: Sequence[Mapping[str, str]] = (),
    *,
    model_id: str = "",
) -> dict[str, Any]:
    """Write ``output`` (predictions CSV, rows in input order), ``skipped.csv`` (the unreadable inputs and the
    ``excluded`` files of the folder listing) and the optional outputs into ``out_dir``.

    ``model_id`` names the trained pipeline (a bundle's ``name@sha256:...`` or the vote's run folder): the ``model``
    column of every row and the report's first line. Where the manifest gives a row's ``label``, its ``truth`` and
    ``correct`` columns are filled and ``metrics.json`` with ``confusion.csv``/``.png`` are written; where it gives a
    ``mask_path``, the predicted mask is scored into ``segmentation_scores.csv`` (see ``dermpipe.ensemble.truth``).
    Returns the summary, with ``scored`` (images scored against a label) and ``balanced accuracy`` (``None`` when
    none was).
    """
    cfg, classes = predictor.cfg, predictor.classes
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # what a killed run left half-written
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output.parent, recursive=False)
    if cfg.outputs.report:  # rewritten at the end: a run killed before then leaves no report that looks current
        (out / "report.html").unlink(missing_ok=True)
    for name in TRUTH_OUTPUTS:  # an earlier run's scores never pass for this input's
        (out / name).unlink(missing_ok=True)
    assets = out / "report_files"
    columns = prediction_columns(classes)
    mask_threshold = predictor.segmenter.predict_cfg.threshold
    truth = TruthScorer(
        manifest, classes, predictor.refer_class, predictor.refer_threshold, mask_threshold, model_id=model_id
    )
    selection = ReviewSelection(cfg.outputs.report_max_images if cfg.outputs.report else 0)
    skipped = SkipLog(excluded)
    isic_rows: list[dict[str, str]] = []
    predicted_counts: Counter[str] = Counter()
    n = refer_count = fallback_count = quality_count = 0
    gradcam_model = predictor.classifiers[0] if cfg.outputs.gradcam else None
    items = [(r["image_id"], r["image_path"]) for r in manifest.rows]
    with atomic_path(output) as partial, open(partial, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for crop, probs in tqdm(predictor.predict(items, skipped), total=len(items), desc="predict", leave=False):
            top = int(np.argmax(probs))
            # an image the models cannot judge (too small, dark, blurred, no lesion found) is referred, never confident
            refer = bool(probs[top] < predictor.refer_threshold) or bool(crop.quality)
            label = truth.label(crop.image_id)
            correct = truth.add(crop.image_id, probs, refer)
            row = {
                "image_id": crop.image_id,
                "path": crop.path,
                **{c: f"{p:.6f}" for c, p in zip(classes, probs)},
                "predicted": classes[top],
                "confidence": f"{probs[top]:.6f}",
                "refer": int(refer),
                "box": crop.box.as_text(),
                "fallback": crop.box.fallback,
                "quality": quality_text(crop.quality),
                "truth": label,
                "correct": "" if correct is None else int(correct),
                "model": model_id,
            }
            writer.writerow(row)
            n += 1
            refer_count += refer
            fallback_count += bool(crop.box.fallback)
            quality_count += bool(crop.quality)
            predicted_counts[classes[top]] += 1
            if cfg.outputs.isic_csv:
                isic_rows.append({"image": crop.image_id, **{c.upper(): f"{p:.6f}" for c, p in zip(classes, probs)}})
            full_mask = None
            if cfg.outputs.masks or truth.needs_mask(crop.image_id):
                full_mask = crop.full_mask(mask_threshold)
            if full_mask is not None and truth.needs_mask(crop.image_id):
                truth.add_mask(crop.image_id, full_mask)
            _write_extras(crop, cfg, out, predictor, full_mask)
            if selection.wants(review_rank(refer, correct)):
                report_row = _report_row(crop, probs, classes, refer, assets, out, gradcam_model, label, correct)
                evicted = selection.add(report_row)
                if evicted is not None:  # pushed out of the first report_max_images: its pictures go too
                    for rel in evicted.images.values():
                        (out / rel).unlink(missing_ok=True)
    skipped.write(out)
    if cfg.outputs.isic_csv:
        write_table(out / "isic_submission.csv", ["image", *[c.upper() for c in classes]], isic_rows)
    metrics = truth.write(out)
    segmentation = (metrics or {}).get("segmentation") or {}
    summary = {
        "model": model_id,
        "images": n,
        "skipped": len(skipped),
        "referred": refer_count,
        "whole-image fallbacks": fallback_count,
        "scored": truth.scored,
        "balanced accuracy": metrics["balanced_accuracy"] if truth.scored and metrics else None,
        "masks scored": truth.masks_scored,
        "mask jaccard": segmentation.get("jaccard"),
        "backbones": ", ".join(predictor.backbones),
        "refer threshold": f"{predictor.refer_threshold:.3f}",
        "temperature": f"{predictor.temperature:.3f}",
        "cache": predictor.cache_summary(),
    }
    if cfg.outputs.report:
        write_report(
            out / "report.html",
            selection.rows,
            classes,
            _report_summary(summary, metrics, len(selection.rows)),
            skipped.rows,
            predicted_counts=predicted_counts,
            quality_warnings=quality_count,
        )
    return summary


def _report_summary(summary: Mapping[str, Any], metrics: Mapping[str, Any] | None, shown: int) -> dict[str, Any]:
    """The report's summary table: the run's summary with the scores against the truth spelled out, numbers rounded
    and what does not apply to this run left out."""
    lines: dict[str, Any] = {}
    for key, value in summary.items():
        if key in ("scored", "balanced accuracy", "masks scored", "mask jaccard") or (key == "model" and not value):
            continue
        lines[key] = value
        if key == "images" and shown < int(value):
            lines["shown in this report"] = f"{shown} (to refer first, then wrong, then the rest)"
    if not metrics:
        return lines
    outside = metrics.get("labels_outside_classes") or {}
    if metrics.get("scored") or outside:
        lines["scored against their label"] = metrics["scored"]
    if outside:
        named = ", ".join(f"{label} ({count})" for label, count in outside.items())
        lines["labels the model cannot name (not scored)"] = named
    if metrics.get("scored"):
        lines["balanced accuracy"] = _number(metrics["balanced_accuracy"])
        lines["accuracy"] = _number(metrics["accuracy"])
        lines["macro AUC (classes present)"] = _number(metrics["macro_auc"])
        refer = metrics.get("refer")
        if refer:
            lines[f"{refer['class']} sensitivity / specificity (referred = sent to a dermatologist)"] = (
                f"{_number(refer['sensitivity'])} / {_number(refer['specificity'])}"
            )
    segmentation = metrics.get("segmentation")
    if segmentation:
        n_missing = segmentation["missing"]
        missing = f" ({n_missing} true masks not scored: see segmentation_scores.csv)" if n_missing else ""
        lines["masks scored"] = f"{segmentation['scored']}{missing}"
        if segmentation["scored"]:
            lines["mask Jaccard / Dice (mean)"] = (
                f"{_number(segmentation['jaccard'])} / {_number(segmentation['dice'])}"
            )
    return lines


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _write_extras(
    crop: CropResult, cfg: PredictConfig, out: Path, predictor: EnsemblePredictor, full_mask: np.ndarray | None
) -> None:
    name = output_stem(crop.image_id)  # unique per id: a/x.jpg and b/x.jpg never share an output file
    if cfg.outputs.masks:
        if full_mask is None:
            full_mask = crop.full_mask(predictor.segmenter.predict_cfg.threshold)
        write_image(out / "masks" / f"{name}_segmentation.png", full_mask * 255)
    if cfg.outputs.crops:
        write_image(out / "crops" / f"{name}.png", crop.crop)


def _report_row(
    crop: CropResult,
    probs: np.ndarray,
    classes: list[str],
    refer: bool,
    assets: Path,
    out: Path,
    gradcam_model: Classifier | None,
    truth: str = "",
    correct: bool | None = None,
) -> ReportRow:
    stem = output_stem(crop.image_id)
    images = {}
    thumb = read_image(crop.path, max_side=4 * 160)
    mask = cv2.resize(crop.probability, thumb.shape[1::-1], interpolation=cv2.INTER_LINEAR) > 127
    images["thumbnail"] = save_thumbnail(thumb, assets / f"{stem}_image.jpg", mask).relative_to(out).as_posix()
    images["crop"] = save_thumbnail(crop.crop, assets / f"{stem}_crop.jpg").relative_to(out).as_posix()
    if gradcam_model is not None:
        from dermpipe.classification.gradcam import gradcam_overlays

        overlay = gradcam_overlays(gradcam_model.model, [crop.crop])[0]
        images["gradcam"] = save_thumbnail(overlay, assets / f"{stem}_gradcam.jpg").relative_to(out).as_posix()
    top = int(np.argmax(probs))
    return ReportRow(
        crop.image_id,
        {c: float(p) for c, p in zip(classes, probs)},
        classes[top],
        float(probs[top]),
        refer,
        crop.box.fallback,
        images,
        crop.quality,
        truth=truth,
        correct=correct,
    )
