"""Batch prediction: a folder of photos -> lesion crops -> five classifiers -> meta-network vote -> one row per image.

Streams in chunks, so memory stays flat over any number of images; every stage goes through the cache, so a rerun
after adding ten images computes ten. When the manifest gives the truth (labels, lesion masks), the predictions are
scored against it as they stream (``dermpipe.ensemble.truth``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from dermpipe.classification.backbones import load_classifier
from dermpipe.classification.config import ClassificationConfig
from dermpipe.classification.ood import OOD_REASON, read_backbone_ood
from dermpipe.classification.prediction import STAGE, CropProbabilities
from dermpipe.configs.loader import load_config
from dermpipe.data.manifest import Manifest, write_table
from dermpipe.data.preprocess import PreprocessConfig
from dermpipe.data.quality import quality_text
from dermpipe.data.reading import read_image, write_image
from dermpipe.engine import csvsafe
from dermpipe.engine.cache import StageCache
from dermpipe.engine.checkpoint import CheckpointError, check_trained_setting, weights_digest
from dermpipe.engine.files import atomic_path, output_stem, remove_stale_temporaries, write_text_atomic
from dermpipe.engine.onnx_runtime import EXPORT_COMMAND, engine_model
from dermpipe.engine.run import check_run_folder
from dermpipe.ensemble import shards
from dermpipe.ensemble.calibration import apply_temperature
from dermpipe.ensemble.config import PredictConfig
from dermpipe.ensemble.meta import load_meta, meta_logits
from dermpipe.ensemble.report import (
    ReportRow,
    ReviewSelection,
    prune_report_files,
    review_rank,
    save_thumbnail,
    write_report,
)
from dermpipe.ensemble.truth import TRUTH_OUTPUTS, TruthScorer, refer_class_of
from dermpipe.errors import plain_message
from dermpipe.segmentation.config import SegmentationConfig
from dermpipe.segmentation.lesion import FALLBACK_TOO_SMALL
from dermpipe.segmentation.prediction import CROP_SETTINGS, CropResult, SegmentationPredictor, SkipLog

logger = logging.getLogger(__name__)


class Classifier:
    """One trained backbone and its per-crop probability cache (shared with the training run's tables)."""

    def __init__(
        self,
        backbone_dir: Path,
        device: torch.device,
        tta: bool,
        cache_root: Path,
        force: bool,
        batch_size: int,
        engine: str = "pytorch",
        threads: int = 0,
    ) -> None:
        """``engine``: what runs the forward passes (``onnxruntime``: the ONNX export beside the weights, cached under
        its own digest); ``self.model`` stays the PyTorch module (Grad-CAM needs its gradients)."""
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
        trained = self.weights = weights_digest(path)  # the checkpoint's sha256, whichever engine runs it
        # the out-of-distribution statistics fitted on these weights' training features; None: the check is off
        self.ood, self.ood_off = read_backbone_ood(backbone_dir, trained)
        runner, digest = engine_model(self.model, path, trained, engine, device, threads)
        self.predictor = CropProbabilities(
            runner,
            digest,
            StageCache(cache_root, STAGE, force=force),
            tta=tta,
            preprocess_cfg=_trained_preprocess(self.meta, backbone_dir, path),
            batch_size=batch_size,
            device=device,
            features=self.ood is not None,
        )
        self.cache = self.predictor.cache

    def probabilities(self, crops: Sequence[CropResult]) -> np.ndarray:
        return self.scored(crops)[0]

    def scored(self, crops: Sequence[CropResult]) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities N x C, each crop's out-of-distribution score over its threshold, or ``None`` when the check
        is off for this backbone), from the same forward pass."""
        probs, features = self.predictor.scored([c.crop_key for c in crops], lambda i: crops[i].crop, desc=self.name)
        if self.ood is None or not len(crops):
            return probs, None
        if features is None:  # an ONNX export made before it had the features output
            self.ood, self.ood_off = None, f"its ONNX export gives no features: export it again ({EXPORT_COMMAND})"
            self.predictor.features = False  # its cache entries, kept without features, are then reused
            logger.warning("out-of-distribution check off for %s: %s", self.name, self.ood_off)
            return probs, None
        return probs, self.ood.ratio(features)


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
            Classifier(root / b, device, cfg.tta, cache, cfg.run.force, cfg.batch_size, cfg.engine, cfg.run.threads)
            for b in self.backbones
        ]
        for c in self.classifiers:
            if list(c.meta["classes"]) != self.classes:
                raise CheckpointError(
                    f"backbone {c.name} was trained on classes {c.meta['classes']}, the vote on {self.classes}: "
                    "retrain the vote with `python ensemble/vote.py`"
                )
        meta_path = Path(cfg.ensemble_run) / "meta.safetensors"  # the vote is tiny: on the CPU, as load_meta leaves it
        self.meta_checkpoint = weights_digest(meta_path)
        self.meta_model, self.meta_weights = engine_model(
            self.meta_model, meta_path, self.meta_checkpoint, cfg.engine, torch.device("cpu"), cfg.run.threads
        )
        seg_run = Path(cfg.segmentation_run)
        seg_cfg_path = seg_run / "config.yaml"
        seg_cfg = load_config(SegmentationConfig, seg_cfg_path) if seg_cfg_path.is_file() else SegmentationConfig()
        crops = agreed_crop_settings(self.classifiers)  # crop as the classifiers' training crops were made
        self.segmenter = SegmentationPredictor(
            seg_run / "best.safetensors",
            seg_cfg,
            device,
            cache,
            cfg.run.force,
            crops,
            strict=seg_cfg_path.is_file(),
            workers=cfg.run.num_workers,
            engine=cfg.engine,
            threads=cfg.run.threads,
        )
        if crops and crops.get("segmentation_weights") not in (None, self.segmenter.weights):
            logger.warning(
                "the backbones were trained on crops of another U-Net than %s: predictions may be off",
                seg_run / "best.safetensors",
            )
        self.temperature = float(self.meta.get("temperature") or 1.0)
        self.refer_threshold = float(self.meta.get("refer_threshold") or 0.0) if cfg.refer else 0.0
        self.ood_check = ood_check_text(self.classifiers)
        log = logger.info if any(c.ood is not None for c in self.classifiers) else logger.warning
        log("out-of-distribution check: %s", self.ood_check)
        # the class whose sensitivity the refer threshold protects (the vote's metadata, else mel when there is one)
        self.refer_class = refer_class_of(self.meta, self.classes)

    def vote(self, crops: Sequence[CropResult]) -> tuple[np.ndarray, np.ndarray]:
        """(stacked N x B x C backbone probabilities, final N x C probabilities)."""
        return self.judge(crops)[:2]

    def judge(self, crops: Sequence[CropResult]) -> tuple[np.ndarray, np.ndarray, list[JudgedCrop]]:
        """``vote``'s arrays and each crop with the out-of-distribution verdict of the same forward passes: unlike
        the training images when the mean over the backbones of its feature distance over their thresholds is above
        1 (``dermpipe.classification.ood``)."""
        scored = [c.scored(crops) for c in self.classifiers]
        stacked = np.stack([probs for probs, _ in scored], axis=1)
        logits = meta_logits(self.meta_model, stacked)
        ratios = [ratio for _, ratio in scored if ratio is not None]
        mean = np.mean(ratios, axis=0) if ratios else np.zeros(len(crops))
        judged = [
            JudgedCrop(**{f.name: getattr(c, f.name) for f in fields(CropResult)},
                       unlike=f"{OOD_REASON} (feature distance {r:.2f} x the threshold)" if r > 1.0 else "")
            for c, r in zip(crops, mean)
        ]  # fmt: skip
        return stacked, apply_temperature(logits, self.temperature), judged

    def predict(self, items: Sequence[tuple[str, str]], skipped: SkipLog) -> Iterator[tuple[CropResult, np.ndarray]]:
        """Stream ``(crop result, final probabilities)`` per image in chunks of ``batch_size``; an image that cannot be
        read is recorded in ``skipped``. Each crop result is a ``JudgedCrop``: ``refer_reason`` reads its verdict."""
        chunk: list[CropResult] = []
        for result in skipped.passed(self.segmenter.crop(items)):
            chunk.append(result)
            if len(chunk) >= self.cfg.batch_size:
                _, final, judged = self.judge(chunk)
                yield from zip(judged, final)
                chunk = []
        if chunk:
            _, final, judged = self.judge(chunk)
            yield from zip(judged, final)

    @property
    def weights(self) -> str:
        """A digest of every trained stage's weights (the U-Net, the backbones in the vote's order, the vote)."""
        digests = [self.segmenter.weights, *(c.predictor.weights_digest for c in self.classifiers), self.meta_weights]
        return hashlib.sha256("\n".join(digests).encode()).hexdigest()

    @property
    def stage_digests(self) -> str:
        """Which models make a row, compactly: ``unet:<8 hex> <backbone>:<8 hex> ... vote:<8 hex>``, each the sha256
        of the stage's checkpoint (as its lineage.json records it; the same whichever engine runs it)."""
        named = [("unet", self.segmenter.weights), *((c.name, c.weights) for c in self.classifiers)]
        return " ".join(f"{name}:{digest[:8]}" for name, digest in [*named, ("vote", self.meta_checkpoint)])

    def cache_counts(self) -> tuple[int, int, int]:
        """(entries reused, entries computed, corrupt entries recomputed) over every stage cache so far."""
        caches = [self.segmenter.cache] + [c.cache for c in self.classifiers]
        return sum(c.reused for c in caches), sum(c.computed for c in caches), sum(c.corrupt for c in caches)

    def cache_summary(self) -> str:
        return cache_text(*self.cache_counts())


def cache_text(reused: int, computed: int, corrupt: int = 0) -> str:
    extra = f", {corrupt} corrupt recomputed" if corrupt else ""  # an entry that failed to verify: never trusted
    return f"cache: {reused} reused, {computed} computed{extra}"


PREDICTION_COLUMNS: tuple[str, ...] = ("predicted", "confidence", "refer", "box", "fallback", "quality")
TRUTH_COLUMNS: tuple[str, ...] = ("truth", "correct", "model")  # always there, so the table's columns never vary


def prediction_columns(classes: Sequence[str]) -> list[str]:
    """The columns of predictions.csv, in order."""
    return ["image_id", "path", *classes, *PREDICTION_COLUMNS, *TRUTH_COLUMNS]


@dataclass(frozen=True)
class JudgedCrop(CropResult):
    """A crop result with the classifiers' out-of-distribution verdict: ``unlike`` is the reason when its features
    are unlike the training images', else ``""``."""

    unlike: str = ""


def ood_check_text(classifiers: Sequence[Classifier]) -> str:
    """What the out-of-distribution check of these backbones is: on (and for which), or off and why."""
    on = [c for c in classifiers if c.ood is not None]
    off = "; ".join(f"{c.name}: {c.ood_off}" for c in classifiers if c.ood is None)
    if not on:
        return f"off ({off}): images unlike the training images are not referred"
    names = ", ".join(c.name for c in on)
    return f"on ({names}: mean feature distance over the thresholds above 1)" + (f"; off for {off}" if off else "")


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


def prediction_row(
    crop: CropResult,
    probs: np.ndarray,
    classes: Sequence[str],
    refer_threshold: float,
    model_id: str,
    truth: str = "",
    correct: bool | None = None,
) -> dict[str, Any]:
    """One image's row of predictions.csv (``prediction_columns``), as text: what batch prediction writes and the
    served API returns."""
    top = int(np.argmax(probs))
    return {
        "image_id": crop.image_id,
        "path": crop.path,
        **{c: f"{p:.6f}" for c, p in zip(classes, probs)},
        "predicted": classes[top],
        "confidence": f"{probs[top]:.6f}",
        "refer": int(bool(refer_reason(crop, probs, refer_threshold))),
        "box": crop.box.as_text(),
        "fallback": crop.box.fallback,
        "quality": quality_text(crop.quality),
        "truth": truth,
        "correct": "" if correct is None else int(correct),
        "model": model_id,
    }


@dataclass(frozen=True)
class BatchInfo:
    """What a batch's outputs say besides its rows: the model and its settings, and which outputs are written. A shard
    records it in its ``part.json``, so the merge writes what the one process would without loading the model."""

    model_id: str
    classes: tuple[str, ...]
    backbones: tuple[str, ...]
    refer_class: str | None
    refer_threshold: float
    temperature: float
    mask_threshold: float
    report: bool
    report_max_images: int
    isic_csv: bool

    @classmethod
    def of(cls, predictor: EnsemblePredictor, model_id: str) -> BatchInfo:
        outputs = predictor.cfg.outputs
        return cls(
            model_id=model_id,
            classes=tuple(predictor.classes),
            backbones=tuple(predictor.backbones),
            refer_class=predictor.refer_class,
            refer_threshold=predictor.refer_threshold,
            temperature=predictor.temperature,
            mask_threshold=float(predictor.segmenter.predict_cfg.threshold),
            report=bool(outputs.report),
            report_max_images=int(outputs.report_max_images),
            isic_csv=bool(outputs.isic_csv),
        )

    def state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> BatchInfo:
        return cls(**{**state, "classes": tuple(state["classes"]), "backbones": tuple(state["backbones"])})


class BatchTally:
    """What a batch collects besides its rows, image by image: counts, skipped inputs, the report's rows, the truth
    scores' inputs. A shard saves its tally (``state``); the merge adds the parts' up in input order (``add_state``),
    which collects what one process over every image does."""

    def __init__(self, info: BatchInfo, manifest: Manifest, excluded: Sequence[Mapping[str, str]] = ()) -> None:
        self.truth = TruthScorer(
            manifest, info.classes, info.refer_class, info.refer_threshold, info.mask_threshold, model_id=info.model_id
        )
        self.selection = ReviewSelection(info.report_max_images if info.report else 0)
        self.skipped = SkipLog(excluded)
        self.excluded = len(self.skipped)  # the folder listing's excluded entries: skipped.csv's first rows
        self.isic_rows: list[dict[str, str]] = []
        self.predicted: Counter[str] = Counter()
        self.images = self.referred = self.fallbacks = self.quality = 0
        self.folders: dict[int, Path] = {}  # id(report row) -> the folder its pictures are under (merged tallies)

    def state(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "referred": self.referred,
            "fallbacks": self.fallbacks,
            "quality": self.quality,
            "predicted": dict(self.predicted),
            "excluded": self.excluded,
            "skipped": self.skipped.rows,
            "isic": self.isic_rows,
            "report": [{**asdict(r), "quality": list(r.quality)} for r in self.selection.rows],
            "truth": self.truth.state(),
        }

    def add_state(self, state: Mapping[str, Any], folder: Path) -> None:
        """Add the tally of the next part (its pictures under ``folder``) after what this one holds."""
        self.images += int(state["images"])
        self.referred += int(state["referred"])
        self.fallbacks += int(state["fallbacks"])
        self.quality += int(state["quality"])
        self.predicted.update({str(k): int(v) for k, v in state["predicted"].items()})
        rows, excluded = [dict(r) for r in state["skipped"]], int(state["excluded"])
        self.skipped.rows[self.excluded : self.excluded] = rows[:excluded]  # every excluded entry, then the unreadable
        self.excluded += excluded
        self.skipped.rows.extend(rows[excluded:])
        self.isic_rows.extend(dict(r) for r in state["isic"])
        for saved in state["report"]:  # in review order per part: the selection keeps the first of all parts'
            row = ReportRow(**{**saved, "quality": tuple(saved["quality"])})
            self.selection.add(row)
            self.folders[id(row)] = folder
        self.truth.add_state(state["truth"])


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
    out, output = Path(out_dir), Path(output)
    info = BatchInfo.of(predictor, model_id)
    _prepare_outputs(out, output, info.report)
    tally = BatchTally(info, manifest, excluded)
    _predict_rows(manifest, predictor, tally, output, out, out)
    return _write_outputs(out, tally, info, predictor.cache_counts())


def predict_part(
    manifest: Manifest,
    predictor: EnsemblePredictor,
    folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    excluded: Sequence[Mapping[str, str]] = (),
    *,
    model_id: str = "",
    part: Mapping[str, Any],
) -> dict[str, Any]:
    """One shard's part: ``manifest`` (its rows of the input list) and ``excluded`` (its excluded folder entries)
    predicted as ``predict_folder`` does, the rows into ``folder/predictions.csv``, the report's pictures under
    ``folder``, the rest of what the merge needs into ``folder/tally.json``, then ``folder/part.json`` (``part``, the
    shard's description, with the batch's settings and counts) last. Per-image outputs (masks, crops) go straight
    into ``out_dir``, where one process writes them. Returns the part's summary (no scores: the merge scores the
    whole set)."""
    folder, out = Path(folder), Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / shards.PART_FILE).unlink(missing_ok=True)  # unfinished from here until the part is whole again
    remove_stale_temporaries(folder)
    info = BatchInfo.of(predictor, model_id)
    tally = BatchTally(info, manifest, excluded)
    _predict_rows(manifest, predictor, tally, folder / shards.PREDICTIONS_FILE, folder, out)
    write_text_atomic(folder / shards.TALLY_FILE, json.dumps(tally.state()) + "\n")
    reused, computed, corrupt = predictor.cache_counts()
    summary = _summary(info, tally, None, (reused, computed, corrupt))
    counts = {k: summary[k] for k in ("images", "skipped", "referred", "whole-image fallbacks")}
    cache = {"reused": reused, "computed": computed, "corrupt": corrupt}
    shards.write_part(folder, {**part, "batch": info.state(), "counts": counts, "cache": cache})
    return summary


def merge_parts(
    parts: Sequence[tuple[Path, Mapping[str, Any]]], out_dir: str | os.PathLike, output: str | os.PathLike
) -> dict[str, Any]:
    """The shards' finished parts (``shards.check_parts``, in shard order) joined into what ``predict_folder`` writes
    over the whole input list, byte for byte: the rows concatenated, the tallies added up, the report's pictures
    copied, then the same writers. Everything is read and checked before the first output is touched."""
    if not parts:
        raise shards.ShardError("no parts to merge")
    out, output = Path(out_dir), Path(output)
    info = BatchInfo.from_state(parts[0][1]["batch"])
    tally = BatchTally(info, Manifest(rows=(), classes=()))
    reused = computed = corrupt = 0
    columns = prediction_columns(info.classes)
    for folder, part in parts:
        name = f"shard {part['shard']} of {part['shards']}"
        again = f"make it again with `{part.get('command', 'dermpipe predict ...')}`"
        try:
            state = json.loads((folder / shards.TALLY_FILE).read_text(encoding="utf-8"))
            with open(folder / shards.PREDICTIONS_FILE, newline="") as f:
                header = next(csvsafe.reader(f), None)
        except (OSError, ValueError) as error:
            why = plain_message(error)
            raise shards.ShardError(f"{name}'s part in {folder} cannot be read ({why}): {again}") from None
        if header != columns:
            raise shards.ShardError(f"{name}'s {folder / shards.PREDICTIONS_FILE} has other columns: {again}")
        tally.add_state(state, folder)
        reused += int(part["cache"]["reused"])
        computed += int(part["cache"]["computed"])
        corrupt += int(part["cache"].get("corrupt", 0))
    pictures = [(tally.folders[id(row)], rel) for row in tally.selection.rows for rel in row.images.values()]
    for folder, rel in pictures:
        if not (folder / rel).is_file():
            part = next(p for f, p in parts if f == folder)
            raise shards.ShardError(f"shard {part['shard']} of {part['shards']} lacks the report picture "
                                    f"{folder / rel}: make it again with `{part.get('command')}`")  # fmt: skip
    _prepare_outputs(out, output, info.report)  # everything read and checked: from here on the outputs are written
    with _prediction_table(output, columns) as writer:
        for folder, _ in parts:
            with open(folder / shards.PREDICTIONS_FILE, newline="") as f:
                writer.writerows(csvsafe.DictReader(f))
    for folder, rel in pictures:  # the report's pictures, where one process leaves them beside the report
        with atomic_path(out / rel) as tmp:
            shutil.copyfile(folder / rel, tmp)
    return _write_outputs(out, tally, info, (reused, computed, corrupt))


def _prepare_outputs(out: Path, output: Path, report: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # what a killed run left half-written
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output.parent, recursive=False)
    if report:  # rewritten at the end: a run killed before then leaves no report that looks current
        (out / "report.html").unlink(missing_ok=True)
    for name in TRUTH_OUTPUTS:  # an earlier run's scores never pass for this input's
        (out / name).unlink(missing_ok=True)


@contextmanager
def _prediction_table(output: Path, columns: Sequence[str]) -> Iterator[csv.DictWriter]:
    """The predictions CSV, header written, rows to come; renamed into place when the block ends without error."""
    with atomic_path(output) as partial, open(partial, "w", newline="") as f:
        writer = csvsafe.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        yield writer


def _predict_rows(
    manifest: Manifest,
    predictor: EnsemblePredictor,
    tally: BatchTally,
    output: Path,
    report_dir: Path,
    out: Path,
) -> None:
    """Predict every row of ``manifest`` into the CSV ``output``, adding each image to ``tally``; the report's
    pictures go under ``report_dir/report_files``, masks and crops under ``out``."""
    cfg, classes = predictor.cfg, predictor.classes
    model_id, truth, selection = tally.truth.model_id, tally.truth, tally.selection
    assets = report_dir / "report_files"
    mask_threshold = predictor.segmenter.predict_cfg.threshold
    gradcam_model = predictor.classifiers[0] if cfg.outputs.gradcam else None
    items = [(r["image_id"], r["image_path"]) for r in manifest.rows]
    with _prediction_table(output, prediction_columns(classes)) as writer:
        for crop, probs in tqdm(predictor.predict(items, tally.skipped), total=len(items), desc="predict", leave=False):
            label = truth.label(crop.image_id)
            refer = bool(refer_reason(crop, probs, predictor.refer_threshold))
            correct = truth.add(crop.image_id, probs, refer)
            row = prediction_row(crop, probs, classes, predictor.refer_threshold, model_id, label, correct)
            top = int(np.argmax(probs))
            writer.writerow(row)
            tally.images += 1
            tally.referred += refer
            tally.fallbacks += bool(crop.box.fallback)
            tally.quality += bool(crop.quality)
            tally.predicted[classes[top]] += 1
            if cfg.outputs.isic_csv:
                tally.isic_rows.append(
                    {"image": crop.image_id, **{c.upper(): f"{p:.6f}" for c, p in zip(classes, probs)}}
                )
            full_mask = None
            if cfg.outputs.masks or truth.needs_mask(crop.image_id):
                full_mask = crop.full_mask(mask_threshold)
            if full_mask is not None and truth.needs_mask(crop.image_id):
                truth.add_mask(crop.image_id, full_mask)
            _write_extras(crop, cfg, out, predictor, full_mask)
            if selection.wants(review_rank(refer, correct)):
                report_row = report_row_of(
                    crop, probs, classes, predictor.refer_threshold, assets, report_dir, gradcam_model, label, correct
                )
                evicted = selection.add(report_row)
                if evicted is not None:  # pushed out of the first report_max_images: its pictures go too
                    for rel in evicted.images.values():
                        (report_dir / rel).unlink(missing_ok=True)


def _summary(
    info: BatchInfo, tally: BatchTally, metrics: Mapping[str, Any] | None, cache: tuple[int, ...]
) -> dict[str, Any]:
    segmentation = (metrics or {}).get("segmentation") or {}
    truth = tally.truth
    return {
        "model": info.model_id,
        "images": tally.images,
        "skipped": len(tally.skipped),
        "referred": tally.referred,
        "whole-image fallbacks": tally.fallbacks,
        "scored": truth.scored,
        "balanced accuracy": metrics["balanced_accuracy"] if truth.scored and metrics else None,
        "masks scored": truth.masks_scored,
        "mask jaccard": segmentation.get("jaccard"),
        "backbones": ", ".join(info.backbones),
        "refer threshold": f"{info.refer_threshold:.3f}",
        "temperature": f"{info.temperature:.3f}",
        "cache": cache_text(*cache),
    }


def _write_outputs(out: Path, tally: BatchTally, info: BatchInfo, cache: tuple[int, ...]) -> dict[str, Any]:
    """What follows the table: ``skipped.csv``, the ISIC CSV, the truth scores, then the report; the summary."""
    classes = list(info.classes)
    tally.skipped.write(out)
    if info.isic_csv:
        write_table(out / "isic_submission.csv", ["image", *[c.upper() for c in classes]], tally.isic_rows)
    metrics = tally.truth.write(out)
    summary = _summary(info, tally, metrics, cache)
    logger.info("prediction %s", summary["cache"])  # in the log, not the report: a rerun writes the same report
    if info.report:
        write_report(
            out / "report.html",
            tally.selection.rows,
            classes,
            _report_summary(summary, metrics, len(tally.selection.rows)),
            tally.skipped.rows,
            predicted_counts=tally.predicted,
            quality_warnings=tally.quality,
        )
    prune_report_files(out, tally.selection.rows if info.report else ())  # only this report's pictures stay
    return summary


def _report_summary(summary: Mapping[str, Any], metrics: Mapping[str, Any] | None, shown: int) -> dict[str, Any]:
    """The report's summary table: the run's summary with the scores against the truth spelled out, numbers rounded
    and what does not apply to this run left out; not the cache tally (it is in the log), so the same inputs and models
    give the same report byte for byte, however much a rerun found cached."""
    lines: dict[str, Any] = {}
    for key, value in summary.items():
        skipped_keys = ("scored", "balanced accuracy", "masks scored", "mask jaccard", "cache")
        if key in skipped_keys or (key == "model" and not value):
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


def report_row_of(
    crop: CropResult,
    probs: np.ndarray,
    classes: Sequence[str],
    refer_threshold: float,
    assets: Path,
    out: Path,
    gradcam_model: Classifier | None,
    truth: str = "",
    correct: bool | None = None,
) -> ReportRow:
    """The report's row of one image: its pictures under ``assets`` (paths relative to ``out``), the Grad-CAM of the
    ensemble's predicted class on ``gradcam_model`` when given, the probabilities, the refer flag and its reason."""
    stem = output_stem(crop.image_id)
    top = int(np.argmax(probs))
    images = {}
    thumb = read_image(crop.path, max_side=4 * 160)
    mask = cv2.resize(crop.probability, thumb.shape[1::-1], interpolation=cv2.INTER_LINEAR) > 127
    images["thumbnail"] = save_thumbnail(thumb, assets / f"{stem}_image.jpg", mask).relative_to(out).as_posix()
    images["crop"] = save_thumbnail(crop.crop, assets / f"{stem}_crop.jpg").relative_to(out).as_posix()
    if gradcam_model is not None:
        from dermpipe.classification.gradcam import gradcam_overlays

        overlay = gradcam_overlays(gradcam_model.model, [crop.crop], [top], gradcam_model.predictor.preprocess_cfg)[0]
        images["gradcam"] = save_thumbnail(overlay, assets / f"{stem}_gradcam.jpg").relative_to(out).as_posix()
    reason = refer_reason(crop, probs, refer_threshold)
    return ReportRow(
        crop.image_id,
        {c: float(p) for c, p in zip(classes, probs)},
        classes[top],
        float(probs[top]),
        bool(reason),
        crop.box.fallback,
        images,
        crop.quality,
        truth=truth,
        correct=correct,
        refer_reason=reason,
        gradcam_of=gradcam_model.name if gradcam_model is not None else "",
    )
