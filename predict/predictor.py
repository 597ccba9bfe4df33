"""The trained pipeline loaded once: the U-Net, the classifiers with their out-of-distribution check, the vote.

``EnsemblePredictor.predict`` streams one judged crop and its final probabilities per image, in input order.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dermpipe.classification.backbones import load_classifier
from dermpipe.classification.config import ClassificationConfig
from dermpipe.classification.ood import OOD_REASON, read_backbone_ood
from dermpipe.classification.prediction import STAGE, CropProbabilities
from dermpipe.configs.loader import load_config
from dermpipe.data.preprocess import PreprocessConfig
from dermpipe.engine.cache import StageCache
from dermpipe.engine.checkpoint import CheckpointError, check_trained_setting, weights_digest
from dermpipe.engine.onnx_runtime import EXPORT_COMMAND, INT8_ENGINE, OnnxModelError, engine_model
from dermpipe.engine.run import check_run_folder
from dermpipe.ensemble.calibration import apply_temperature
from dermpipe.ensemble.meta import load_meta, meta_logits
from dermpipe.predict.config import PredictConfig
from dermpipe.predict.truth import refer_class_of
from dermpipe.segmentation.config import SegmentationConfig
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


def _check_int8(engine: str, runners: Sequence[Any]) -> None:
    """``onnxruntime-int8`` with no int8 network beside the weights is refused (it would be float32 unawares)."""
    if engine == INT8_ENGINE and not any(getattr(r, "precision", "") == "int8" for r in runners):
        raise OnnxModelError(
            "--engine onnxruntime-int8: no int8 network beside these weights; make them with `dermpipe export --model "
            "BUNDLE --format onnx --quantize int8 --calibration MANIFEST` (or predict with --engine onnxruntime)"
        )


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
            prefetch=cfg.run.prefetch,
        )
        if crops and crops.get("segmentation_weights") not in (None, self.segmenter.weights):
            logger.warning(
                "the backbones were trained on crops of another U-Net than %s: predictions may be off",
                seg_run / "best.safetensors",
            )
        _check_int8(cfg.engine, [self.segmenter.model, *(c.predictor.model for c in self.classifiers)])
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
