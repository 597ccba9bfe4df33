"""Votes the meta-network must beat on the same images: mean, majority, the best single backbone, logistic stacking."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from dermpipe.ensemble.meta import LOG_FLOOR, cross_validation_folds, selection_score

logger = logging.getLogger(__name__)


def _normalise(scores: np.ndarray) -> np.ndarray:
    return scores / scores.sum(axis=1, keepdims=True)


def mean_vote(probs: np.ndarray) -> np.ndarray:
    """(images, backbones, classes) -> (images, classes): the backbones' probabilities averaged."""
    return _normalise(probs.mean(axis=1))


def majority_vote(probs: np.ndarray) -> np.ndarray:
    """Each backbone votes for its top class; most votes wins, ties broken by the mean probability.

    Returned as scores that sum to one per image, ``(votes + mean / 2) / (backbones + 1/2)``: the half-weighted mean
    can never outweigh one vote, but orders tied classes (and gives the AUC a ranking within equal vote counts).
    """
    n_images, n_backbones, n_classes = probs.shape
    votes = np.zeros((n_images, n_classes))
    np.add.at(votes, (np.repeat(np.arange(n_images), n_backbones), probs.argmax(axis=2).ravel()), 1.0)
    return (votes + 0.5 * mean_vote(probs)) / (n_backbones + 0.5)


def best_single(probs: np.ndarray, labels: np.ndarray, backbones: Sequence[str]) -> tuple[int, tuple[dict, ...]]:
    """The backbone with the best balanced accuracy (ties: lower log-loss) on the fit set, never the test set.

    Returns its index and every backbone's fit-set scores.
    """
    scores = []
    for b, name in enumerate(backbones):
        bacc, loss = selection_score(_normalise(probs[:, b, :]), labels)
        scores.append({"backbone": name, "fit_balanced_accuracy": bacc, "fit_log_loss": loss})
    best = min(range(len(backbones)), key=lambda b: (-scores[b]["fit_balanced_accuracy"], scores[b]["fit_log_loss"]))
    logger.info(
        "best single backbone on the fit set: %s (balanced accuracy %.4f)",
        backbones[best],
        scores[best]["fit_balanced_accuracy"],
    )
    return best, tuple(scores)


def stacking_features(probs: np.ndarray, inputs: str = "log_probs") -> np.ndarray:
    """The flattened backbones x classes probabilities (or their logarithms) per image."""
    flat = probs.reshape(len(probs), -1)
    if inputs == "log_probs":
        return np.log(np.clip(flat, LOG_FLOOR, 1.0))
    if inputs == "probs":
        return flat
    raise ValueError(f"logistic stacking inputs {inputs!r} is not one of ['log_probs', 'probs']")


@dataclass(frozen=True)
class LogisticStacking:
    """A class-balanced multinomial logistic regression over the stacked probabilities (Wolpert 1992 stacking)."""

    pipeline: Pipeline
    c: float
    inputs: str
    n_classes: int
    cv_scores: tuple[dict, ...]

    def predict_proba(self, probs: np.ndarray) -> np.ndarray:
        """(images, backbones, classes) -> (images, classes); a class absent from the fit set gets probability 0."""
        out = np.zeros((len(probs), self.n_classes))
        out[:, self.pipeline.classes_] = self.pipeline.predict_proba(stacking_features(probs, self.inputs))
        return out


def _fit_pipeline(features: np.ndarray, labels: np.ndarray, c: float, seed: int) -> Pipeline:
    pipeline = make_pipeline(
        StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=2000, random_state=seed)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings at the weakest regularisation of the grid
        return pipeline.fit(features, labels)


def logistic_stacking(
    probs: np.ndarray,
    labels: np.ndarray,
    c_grid: Sequence[float] = (0.01, 0.1, 1.0, 10.0),
    inputs: str = "log_probs",
    cv_folds: int = 5,
    seed: int = 0,
) -> LogisticStacking:
    """Logistic stacking with C chosen by stratified K-fold CV on the fit set (balanced accuracy, ties by
    log-loss), then refitted on the whole fit set.
    """
    features = stacking_features(probs, inputs)
    n_classes = probs.shape[2]
    folds = cross_validation_folds(labels, cv_folds, seed)
    scores = []
    for c in c_grid:
        oof = np.zeros((len(labels), n_classes))
        for train_idx, val_idx in folds:
            pipeline = _fit_pipeline(features[train_idx], labels[train_idx], c, seed)
            oof[np.ix_(val_idx, pipeline.classes_)] = pipeline.predict_proba(features[val_idx])
        bacc, loss = selection_score(oof, labels)
        scores.append({"C": float(c), "cv_balanced_accuracy": bacc, "cv_log_loss": loss})
    best = min(scores, key=lambda s: (-s["cv_balanced_accuracy"], s["cv_log_loss"]))
    logger.info(
        "logistic stacking: C=%g chosen by %d-fold CV (balanced accuracy %.4f)",
        best["C"],
        len(folds),
        best["cv_balanced_accuracy"],
    )
    pipeline = _fit_pipeline(features, labels, best["C"], seed)
    return LogisticStacking(pipeline, best["C"], inputs, n_classes, tuple(scores))
