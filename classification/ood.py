"""The out-of-distribution check: how far a crop's pooled features lie from those of the training images.

After a backbone finishes training, its pooled features (the vector the head reads, evaluation transform) on the
training crops give one mean per class and one covariance shared by the classes, shrunk by Ledoit-Wolf so its
inverse is stable with more feature dimensions than images per class. An image's score is its Mahalanobis distance to
the nearest class mean (Lee et al. 2018, without input perturbation); the threshold is a high percentile
(``train.ood_percentile``, default 99.5) of the validation crops' scores, so about 0.5% of images like the validation
ones pass it. The statistics are stored beside the weights as ``ood.safetensors``: the class means and the shared
precision's Cholesky factor, already applied to the means (``score`` is then one matrix product and a distance),
with metadata naming the weights they were fitted on (a statistics file of other weights is ignored, and says so).

A fold mean (``train.fold_models: mean``) is checked as one classifier: its features are its K members' pooled
features side by side (``FoldMeanClassifier.forward_with_features``), fitted on the whole training split.

Prediction refers an image "unlike the training images" when the mean over the backbones of score / threshold is
above 1: each backbone's own scale, and one loud backbone is enough only when it is far past its threshold.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dermpipe.engine.files import atomic_path
from dermpipe.errors import plain_message

logger = logging.getLogger(__name__)

OOD_FILE = "ood.safetensors"
OOD_REASON = "unlike the training images"
STAGE = "ood"
DEFAULT_PERCENTILE = 99.5


class OodStatsError(ValueError):
    """Features that cannot be fitted (too few images, mismatched shapes)."""


@dataclass(frozen=True)
class OodStats:
    """One backbone's out-of-distribution statistics: whitened class means, the whitening, the threshold."""

    centres: np.ndarray  # K x D: each class's mean feature times ``whitening`` (classes with training images)
    whitening: np.ndarray  # D x D: the Cholesky factor L of the shared precision (precision = L L^T)
    threshold: float  # a distance above it is unlike the training images
    info: dict[str, Any]  # weights_digest, backbone, percentile, images fitted and validated, classes

    @property
    def feature_dim(self) -> int:
        return int(self.whitening.shape[0])

    @property
    def weights_digest(self) -> str:
        return str(self.info.get("weights_digest", ""))

    def score(self, features: np.ndarray) -> np.ndarray:
        """The Mahalanobis distance of each row of ``features`` (N x D) to the nearest class mean (N, float64)."""
        z = np.asarray(features, np.float64) @ self.whitening
        d2 = (z * z).sum(1)[:, None] - 2.0 * z @ self.centres.T + (self.centres * self.centres).sum(1)[None, :]
        return np.sqrt(np.maximum(d2.min(1), 0.0))

    def ratio(self, features: np.ndarray) -> np.ndarray:
        """Score over threshold: above 1 is unlike the training images."""
        return self.score(features) / self.threshold

    def describe(self) -> str:
        """One line for logs and the model card: the threshold and how it was set."""
        i = self.info
        return (
            f"Mahalanobis distance to the nearest class mean of the pooled features above {self.threshold:.4g}: the "
            f"{i.get('percentile')}th percentile of the {i.get('threshold_images')} {i.get('threshold_split')} crops "
            f"(fitted on {i.get('fit_images')} training crops, {self.feature_dim} features)"
        )

    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.numpy import save_file

        meta = {"stage": STAGE, "threshold": repr(float(self.threshold)), "feature_dim": str(self.feature_dim)}
        meta.update({k: json.dumps(v) for k, v in self.info.items()})
        tensors = {"centres": np.ascontiguousarray(self.centres), "whitening": np.ascontiguousarray(self.whitening)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return Path(path)


def load_ood(path: str | os.PathLike) -> OodStats:
    """The statistics saved by ``OodStats.save``; ``ValueError`` (or ``OSError``) when the file is not one."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        if meta.get("stage") != STAGE:
            raise ValueError(f"{path} is not out-of-distribution statistics (stage {meta.get('stage')!r})")
        centres, whitening = f.get_tensor("centres"), f.get_tensor("whitening")
    info = {k: json.loads(v) for k, v in meta.items() if k not in ("stage", "threshold", "feature_dim")}
    return OodStats(centres, whitening, float(meta["threshold"]), info)


def fit_ood(
    features: np.ndarray,
    labels: Sequence[int],
    threshold_features: np.ndarray | None = None,
    percentile: float = DEFAULT_PERCENTILE,
    **info: Any,
) -> OodStats:
    """Class means and a Ledoit-Wolf shared covariance of the training ``features`` (N x D) with their class
    ``labels`` (negative: unlabelled, left out); the threshold is the ``percentile`` of ``threshold_features``' scores
    (the validation crops; without them, the training crops' own). ``info`` is stored with the statistics."""
    from sklearn.covariance import LedoitWolf

    x = np.asarray(features, np.float64)
    y = np.asarray(labels, np.int64)
    if x.ndim != 2 or len(x) != len(y):
        raise OodStatsError(f"features of shape {x.shape} and {len(y)} labels do not line up")
    keep = y >= 0
    x, y = x[keep], y[keep]
    present = np.unique(y)
    if len(x) < 2 or len(x) <= len(present):
        raise OodStatsError(f"{len(x)} labelled training images are too few to fit the out-of-distribution check")
    means = np.stack([x[y == c].mean(0) for c in present])
    centred = x - means[np.searchsorted(present, y)]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    # a tiny ridge keeps the factorisation defined for features that never vary (a dead channel)
    whitening = np.linalg.cholesky(precision + 1e-10 * np.trace(precision) / len(precision) * np.eye(len(precision)))
    stats = OodStats(means @ whitening, whitening, 1.0, {})
    held = threshold_features is not None and len(threshold_features) > 0
    scores = stats.score(threshold_features if held else x)  # type: ignore[arg-type]
    threshold = float(np.percentile(scores, percentile))
    info = {
        **info,
        "percentile": float(percentile),
        "fit_images": int(len(x)),
        "threshold_images": int(len(scores)),
        "threshold_split": info.get("threshold_split", "validation" if held else "training"),
        "class_index": [int(c) for c in present],
    }
    return OodStats(stats.centres, whitening, max(threshold, 1e-12), info)


def read_backbone_ood(backbone_dir: Path, weights_digest: str) -> tuple[OodStats | None, str]:
    """(the statistics beside a backbone's weights, "") or (``None``, why the check is off for this backbone)."""
    path = backbone_dir / OOD_FILE
    if not path.is_file():
        return None, f"no {OOD_FILE} beside its weights (trained before the check existed: retrain it)"
    try:
        stats = load_ood(path)
    except (OSError, ValueError, KeyError) as e:
        return None, f"{path} cannot be read ({plain_message(e)}): retrain the backbone"
    if stats.weights_digest != weights_digest:
        return None, f"{path} was fitted on other weights than {backbone_dir / 'best.safetensors'}: retrain it"
    return stats, ""


def unlike_training(ratios: Sequence[np.ndarray | None]) -> np.ndarray | None:
    """Which images are unlike the training images, from each backbone's score / threshold (``None``: that backbone
    has no statistics): the mean ratio over the backbones that have them above 1; ``None`` when none has."""
    present = [np.asarray(r, np.float64) for r in ratios if r is not None]
    if not present:
        return None
    return np.mean(present, axis=0) > 1.0


def fit_backbone(
    predictor: Any,
    run_dir: Path,
    fit: tuple[Sequence[str], Callable[[int], np.ndarray], np.ndarray],
    held_out: tuple[Sequence[str], Callable[[int], np.ndarray]] | None,
    percentile: float,
) -> OodStats | None:
    """Fit and save ``run_dir/ood.safetensors`` for the trained backbone behind ``predictor`` (a
    ``CropProbabilities`` with features on): ``fit`` gives the training crops' keys, their preprocessed pixels and
    labels, ``held_out`` the validation crops'. Reused when the file is there for these weights and percentile."""
    path = run_dir / OOD_FILE
    existing, _ = read_backbone_ood(run_dir, predictor.weights_digest)
    if existing is not None and existing.info.get("percentile") == float(percentile):
        return existing
    keys, image, labels = fit
    _, train_features = predictor.scored(keys, image, preprocessed=True, desc="features train")
    held = None
    if held_out is not None and len(held_out[0]):
        _, held = predictor.scored(held_out[0], held_out[1], preprocessed=True, desc="features val")
    try:
        stats = fit_ood(
            train_features,
            labels,
            held,
            percentile,
            weights_digest=predictor.weights_digest,
            backbone=predictor.model.backbone_name,
        )
    except OodStatsError as e:
        logger.warning("out-of-distribution check not fitted for %s: %s", run_dir, e)
        return None
    stats.save(path)
    logger.info("out-of-distribution check of %s: %s", run_dir.name, stats.describe())
    return stats


def fit_after_training(
    predictor: Any, run_dir: Path, rows: Any, dataset: Callable[..., Any], column: str, percentile: float
) -> OodStats | None:
    """The check of a finished training run: fitted on ``rows.fit`` (the training crops, evaluation transform), its
    threshold from ``rows.tables['val']``. Skipped when ``percentile`` is 0 (off) and for a fold model (``rows``
    with an out-of-fold table): its backbone's shipped model (the fold mean, or the refit) gets its own."""
    from dermpipe.classification.folds import row_keys

    if not percentile or "oof" in rows.tables or not getattr(predictor, "features", False):
        return None
    fit_ds = dataset(rows.fit)
    fit = (row_keys(rows.fit, column), lambda i: fit_ds.images.get(i)[0], np.asarray(fit_ds.labels))
    held_out = None
    val = rows.tables.get("val")
    if val is not None and len(val):
        val_ds = dataset(val)
        held_out = (row_keys(val, column), lambda i: val_ds.images.get(i)[0])
    return fit_backbone(predictor, run_dir, fit, held_out, percentile)


def ood_description(path: Path, weights: Path) -> dict[str, Any]:
    """What a bundle says of a backbone's statistics file: its threshold and how it was set, and whether it was
    fitted on the weights beside it (when not, prediction leaves the check off for that backbone)."""
    from dermpipe.engine.files import file_digest

    try:
        stats = load_ood(path)
    except (OSError, ValueError, KeyError) as e:
        return {"usable": False, "why": f"cannot be read ({plain_message(e)})"}
    fitted = stats.weights_digest == file_digest(weights)
    return {
        "usable": fitted,
        "threshold": stats.threshold,
        "percentile": stats.info.get("percentile"),
        "threshold_split": stats.info.get("threshold_split"),
        "threshold_images": stats.info.get("threshold_images"),
        "fit_images": stats.info.get("fit_images"),
        "feature_dim": stats.feature_dim,
        **({} if fitted else {"why": "fitted on other weights"}),
    }
