"""Temperature scaling, reliability diagrams (Guo et al. 2017) and referral at a threshold for a target sensitivity."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from scipy.special import log_softmax, softmax

from dermpipe.engine.files import atomic_path

logger = logging.getLogger(__name__)

TEMPERATURE_RANGE = (0.05, 20.0)


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    return float(-log_softmax(logits / temperature, axis=1)[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The one temperature T minimising the log-loss of ``softmax(logits / T)`` on held-out images.

    ``logits`` may be any scores defined up to a per-image constant, e.g. log-probabilities. T > 1 softens an
    over-confident model, T < 1 sharpens an under-confident one; the argmax never changes.
    """
    if len(labels) == 0:
        raise ValueError("temperature scaling needs labelled held-out images")
    from scipy.optimize import minimize_scalar  # imported when fitting: prediction starts without it

    result = minimize_scalar(
        lambda log_t: _nll(logits, labels, math.exp(log_t)),
        bounds=tuple(math.log(t) for t in TEMPERATURE_RANGE),
        method="bounded",
        options={"xatol": 1e-4},
    )
    temperature = float(math.exp(result.x))
    logger.info(
        "temperature %.3f: held-out log-loss %.4f -> %.4f",
        temperature,
        _nll(logits, labels, 1.0),
        _nll(logits, labels, temperature),
    )
    return temperature


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities ``softmax(logits / T)``."""
    return softmax(logits / temperature, axis=1)


def _bins(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin: image count, mean top probability, accuracy of the top class."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    which = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(which, confidence, n_bins) / counts
        accuracy = np.bincount(which, correct, n_bins) / counts
    return counts, mean_confidence, accuracy


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: the image-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    counts, confidence, accuracy = _bins(probs, labels, n_bins)
    filled = counts > 0
    return float((counts[filled] * np.abs(accuracy[filled] - confidence[filled])).sum() / counts.sum())


def reliability_diagram(
    probs: np.ndarray | Mapping[str, np.ndarray],
    labels: np.ndarray,
    path: str | os.PathLike,
    n_bins: int = 15,
    title: str = "Reliability diagram",
) -> Path:
    """Accuracy against confidence per bin (one curve per entry when ``probs`` maps names to arrays), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = probs if isinstance(probs, Mapping) else {"model": probs}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5, 6), height_ratios=(3, 1), sharex=True)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for name, p in curves.items():
        counts, confidence, accuracy = _bins(p, labels, n_bins)
        filled = counts > 0
        ece = expected_calibration_error(p, labels, n_bins)
        ax.plot(confidence[filled], accuracy[filled], "o-", label=f"{name} (ECE {ece:.3f})")
        hist.hist(p.max(axis=1), bins=n_bins, range=(0, 1), histtype="step", label=name)
    ax.set(ylabel="accuracy of the top class", xlim=(0, 1), ylim=(0, 1), title=title)
    ax.legend(loc="upper left", fontsize=8)
    hist.set(xlabel="top probability (confidence)", ylabel="images")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path


def referral_outcome(probs: np.ndarray, labels: np.ndarray, class_index: int, threshold: float) -> dict[str, float]:
    """What the refer rule does: an image is referred when its top probability is below ``threshold``; an image of
    ``class_index`` counts as caught when it is predicted as that class or referred (a dermatologist sees it).
    """
    top = probs.max(axis=1)
    referred = top < threshold
    positive = labels == class_index
    predicted = probs.argmax(axis=1) == class_index
    kept = ~referred
    n_pos = int(positive.sum())
    return {
        "referred_fraction": float(referred.mean()) if len(labels) else float("nan"),
        "sensitivity_without_referral": float(predicted[positive].mean()) if n_pos else float("nan"),
        "sensitivity_with_referral": float((predicted | referred)[positive].mean()) if n_pos else float("nan"),
        "accuracy_of_kept": float((probs.argmax(axis=1) == labels)[kept].mean()) if kept.any() else float("nan"),
    }


def refer_threshold(probs: np.ndarray, labels: np.ndarray, class_index: int, target_sensitivity: float) -> float:
    """The lowest threshold on the top probability whose refer rule reaches ``target_sensitivity`` for the class.

    The rule (see ``referral_outcome``): refer when ``max_c p_c < threshold``; sensitivity counts an image of the
    class as caught when its top class is that class or it is referred. On these (held-out) images we need
    ``ceil(target * n)`` caught; the ones the argmax misses are referred in order of increasing top probability, and
    the threshold sits just above the top probability of the last one needed (so ties are referred too). 0 means
    the argmax alone reaches the target and nothing is referred.
    """
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target sensitivity {target_sensitivity} must lie in (0, 1]")
    positive = labels == class_index
    n_pos = int(positive.sum())
    if n_pos == 0:
        raise ValueError(f"no image of class index {class_index} among the held-out labels: cannot set a threshold")
    need = math.ceil(target_sensitivity * n_pos - 1e-9)
    predicted = probs.argmax(axis=1) == class_index
    caught = int((positive & predicted).sum())
    if caught >= need:
        return 0.0
    missed_top = np.sort(probs.max(axis=1)[positive & ~predicted])
    return float(np.nextafter(missed_top[need - caught - 1], np.inf))


# a top probability this close to 1 prints as 1.000000 in predictions.csv: saturated
SATURATED = 1.0 - 5e-7


def never_refers(
    threshold: float, n_classes: int, temperature: float = 1.0, top_probabilities: np.ndarray | None = None
) -> str:
    """Why a calibration's refer rule (refer when the top probability is below ``threshold``) can never refer an
    image on confidence, or ``""``: a threshold of at most 1/``n_classes`` (no top probability is lower), or a
    ``temperature`` that saturates the held-out images' ``top_probabilities`` (99% or more of them at 1.000000: then
    any image, however unlike them, is predicted at full confidence)."""
    if threshold <= 1.0 / max(n_classes, 1):
        return (
            f"the refer threshold {threshold:.3g} is at most 1/{n_classes}, below every possible top probability: "
            "no image is ever referred for low confidence (only for input quality, no lesion or unlike the training "
            "images)"
        )
    top = np.asarray(top_probabilities if top_probabilities is not None else [], np.float64)
    saturated = float((top >= SATURATED).mean()) if len(top) else 0.0
    if saturated >= 0.99:
        return (
            f"the temperature {temperature:.3g} saturates the probabilities: {saturated:.1%} of the held-out images "
            f"get a top probability of 1.000000, so the refer threshold {threshold:.3g} almost never refers an image "
            "for low confidence"
        )
    return ""
