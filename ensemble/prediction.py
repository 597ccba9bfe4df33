"""Batch prediction: a folder of photos -> lesion crops -> five classifiers -> meta-network vote -> one row per image.

Streams in chunks, so memory stays flat over any number of images; every stage goes through the cache, so a rerun
after adding ten images computes ten.
"""

from __future__ import annotations

import csv
import logging
import os
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
from dermpipe.ensemble.report import ReportRow, save_thumbnail, write_report
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
                f"{path} not found: train it with `python classification/train.py --backbone {backbone_dir.name}`"
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


def predict_folder(
    manifest: Manifest,
    predictor: EnsemblePredictor,
    output: str | os.PathLike,
    out_dir: str | os.PathLike,
    excluded: Sequence[Mapping[str, str]] = (),
) -> dict[str, Any]:
    """Write ``output`` (predictions CSV, rows in input order), ``skipped.csv`` (the unreadable inputs and the
    ``excluded`` files of the folder listing) and the optional outputs into ``out_dir``."""
    cfg, classes = predictor.cfg, predictor.classes
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # what a killed run left half-written
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output.parent, recursive=False)
    if cfg.outputs.report:  # rewritten at the end: a run killed before then leaves no report that looks current
        (out / "report.html").unlink(missing_ok=True)
    assets = out / "report_files"
    columns = ["image_id", "path", *classes, "predicted", "confidence", "refer", "box", "fallback", "quality"]
    report_rows: list[ReportRow] = []
    skipped = SkipLog(excluded)
    isic_rows: list[dict[str, str]] = []
    n = refer_count = fallback_count = 0
    gradcam_model = predictor.classifiers[0] if cfg.outputs.gradcam else None
    items = [(r["image_id"], r["image_path"]) for r in manifest.rows]
    with atomic_path(output) as partial, open(partial, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for crop, probs in tqdm(predictor.predict(items, skipped), total=len(items), desc="predict", leave=False):
            top = int(np.argmax(probs))
            # an image the models cannot judge (too small, dark, blurred, no lesion found) is referred, never confident
            refer = bool(probs[top] < predictor.refer_threshold) or bool(crop.quality)
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
            }
            writer.writerow(row)
            n += 1
            refer_count += refer
            fallback_count += bool(crop.box.fallback)
            if cfg.outputs.isic_csv:
                isic_rows.append({"image": crop.image_id, **{c.upper(): f"{p:.6f}" for c, p in zip(classes, probs)}})
            _write_extras(crop, cfg, out, predictor, gradcam_model)
            if cfg.outputs.report and len(report_rows) < cfg.outputs.report_max_images:
                report_rows.append(_report_row(crop, probs, classes, refer, assets, out, gradcam_model))
    skipped.write(out)
    if cfg.outputs.isic_csv:
        write_table(out / "isic_submission.csv", ["image", *[c.upper() for c in classes]], isic_rows)
    summary = {
        "images": n,
        "skipped": len(skipped),
        "referred": refer_count,
        "whole-image fallbacks": fallback_count,
        "backbones": ", ".join(predictor.backbones),
        "refer threshold": f"{predictor.refer_threshold:.3f}",
        "temperature": f"{predictor.temperature:.3f}",
        "cache": predictor.cache_summary(),
    }
    if cfg.outputs.report:
        write_report(out / "report.html", report_rows, classes, summary, skipped.rows)
    return summary


def _write_extras(
    crop: CropResult, cfg: PredictConfig, out: Path, predictor: EnsemblePredictor, gradcam_model: Classifier | None
) -> None:
    name = output_stem(crop.image_id)  # unique per id: a/x.jpg and b/x.jpg never share an output file
    if cfg.outputs.masks:
        mask = crop.full_mask(predictor.segmenter.predict_cfg.threshold) * 255
        write_image(out / "masks" / f"{name}_segmentation.png", mask)
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
    )
