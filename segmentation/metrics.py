"""Lesion segmentation metrics as the ISIC challenges score them (Codella et al. 2019, arXiv:1902.03368).

Per image, from its confusion counts: Jaccard, Dice, sensitivity, specificity, accuracy and the ISIC 2018
thresholded Jaccard (an image below 0.65 counts 0), then the plain mean over images. The edge cases and the file
rules follow the official ``isic-challenge-scoring`` package: a pixel above 128 is lesion, a ratio whose denominator
is zero scores 1.0, masks are compared at the size of the true mask and a prediction of another size is refused.
Counts are kept apart from their reduction (like ``segmentation_models_pytorch.metrics.get_stats``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dermpipe.errors import DermpipeError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("jaccard", "thresholded_jaccard", "dice", "sensitivity", "specificity", "accuracy")
JACCARD_THRESHOLD = 0.65
# isic-challenge-scoring binarises 8-bit masks with `value > 128`, so a grey 128 is background.
GREY_THRESHOLD = 128
MASK_SUFFIXES: tuple[str, ...] = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")
_ISIC_ID = re.compile(r"ISIC_[0-9]{7}")
_MISSING_LISTED = 5


class MaskScoringError(DermpipeError):
    """Mask folders or files that cannot be scored (missing prediction, wrong size, not a greyscale mask)."""


def binary_mask(mask: np.ndarray) -> np.ndarray:
    """A boolean lesion mask from a bool, 0/1 or 0..255 array (0..255: above 128 is lesion, as the ISIC scorer).

    An array whose values all lie in [0, 1] is read as a 0/1 mask (or probabilities, split at 0.5).
    """
    mask = np.asarray(mask)
    if mask.dtype == np.bool_ or mask.size == 0:
        return mask.astype(bool, copy=False)
    if mask.min() < 0:
        raise ValueError("mask has negative values (logits?); pass a bool, 0/1, probability or 0..255 mask")
    return mask > 0.5 if mask.max() <= 1 else mask > GREY_THRESHOLD


def confusion_counts(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int, int]:
    """Pixel counts ``(tp, fp, fn, tn)`` of a predicted mask against the true one (same shape; see ``binary_mask``)."""
    pred_mask, truth_mask = binary_mask(pred), binary_mask(truth)
    if pred_mask.shape != truth_mask.shape:
        raise ValueError(f"prediction shape {pred_mask.shape} differs from truth shape {truth_mask.shape}")
    tp = int(np.count_nonzero(pred_mask & truth_mask))
    fp = int(np.count_nonzero(pred_mask)) - tp
    fn = int(np.count_nonzero(truth_mask)) - tp
    tn = truth_mask.size - tp - fp - fn
    return tp, fp, fn, tn


def scores_from_counts(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """The six ISIC metrics of one image from its confusion counts; an empty denominator scores 1.0 (official rule)."""
    union = tp + fp + fn
    jaccard = tp / union if union else 1.0
    return {
        "jaccard": jaccard,
        "thresholded_jaccard": jaccard if jaccard >= JACCARD_THRESHOLD else 0.0,
        "dice": 2 * tp / (2 * tp + fp + fn) if union else 1.0,
        "sensitivity": tp / (tp + fn) if tp + fn else 1.0,
        "specificity": tn / (tn + fp) if tn + fp else 1.0,
        "accuracy": (tp + tn) / (tp + fp + fn + tn),
    }


def image_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """The six ISIC metrics of one predicted mask against its true mask, compared pixel for pixel."""
    return scores_from_counts(*confusion_counts(pred, truth))


def mean_scores(per_image: Sequence[dict[str, float]]) -> dict[str, float]:
    """Each metric averaged over images (every image weighs the same, as in the challenge ranking)."""
    if not per_image:
        raise ValueError("no per-image scores to average")
    return {name: float(np.mean([scores[name] for scores in per_image], dtype=np.float64)) for name in METRICS}


def batch_scores_torch(logits: torch.Tensor, truth: torch.Tensor, threshold: float = 0.5) -> dict[str, torch.Tensor]:
    """Per-image ISIC metrics of a batch at the model's resolution, for validation during training.

    ``logits`` and ``truth`` are ``(N, 1, H, W)`` (any shape with the batch first); a pixel is lesion where
    ``sigmoid(logit) > threshold`` and where ``truth > 0.5``. Returns float64 tensors of shape ``(N,)`` under the
    names of ``METRICS``, with the same edge cases as ``scores_from_counts``. The official numbers come from
    ``image_scores`` on full-size masks.
    """
    import torch

    if logits.shape != truth.shape:
        raise ValueError(f"logits shape {tuple(logits.shape)} differs from truth shape {tuple(truth.shape)}")
    pred_mask = (torch.sigmoid(logits.detach()) > threshold).flatten(1)
    truth_mask = (truth.detach() > 0.5).flatten(1)
    tp = (pred_mask & truth_mask).sum(1).double()
    fp = pred_mask.sum(1).double() - tp
    fn = truth_mask.sum(1).double() - tp
    tn = pred_mask.shape[1] - tp - fp - fn

    def ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
        return torch.where(denominator > 0, numerator / denominator.clamp(min=1), torch.ones_like(numerator))

    jaccard = ratio(tp, tp + fp + fn)
    return {
        "jaccard": jaccard,
        "thresholded_jaccard": torch.where(jaccard >= JACCARD_THRESHOLD, jaccard, torch.zeros_like(jaccard)),
        "dice": ratio(2 * tp, 2 * tp + fp + fn),
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "accuracy": (tp + tn) / (tp + fp + fn + tn),
    }


def mask_key(path: Path) -> str:
    """The id that pairs a true mask with its prediction: the ISIC id in the name, else the file stem."""
    match = _ISIC_ID.search(path.stem)
    return match.group(0) if match else path.stem


def read_mask(path: Path) -> np.ndarray:
    """An 8-bit single-channel mask file as a 2-D uint8 array; colour, 16-bit or unreadable files are refused."""
    import cv2

    from dermpipe.data.reading import ImageReadError, image_size

    try:
        image_size(path)  # the reader's header checks and its bound on decoded pixels, before anything is decoded
    except ImageReadError as error:
        raise MaskScoringError(f"cannot read mask {error}") from None
    # IMREAD_UNCHANGED rather than IMREAD_GRAYSCALE: the official scorer refuses colour and 16-bit masks, and a silent
    # grey conversion would turn e.g. a pure red lesion (grey 76) into background.
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise MaskScoringError(f"cannot read mask {path}: not an image file or corrupt")
    if image.ndim != 2 or image.dtype != np.uint8:
        channels = 1 if image.ndim == 2 else image.shape[2]
        raise MaskScoringError(
            f"mask {path} has {channels} channel(s) of {image.dtype}; save it as an 8-bit greyscale PNG (0/255)"
        )
    return image


def _masks_by_key(folder: Path, role: str) -> dict[str, list[Path]]:
    if not folder.is_dir():
        raise MaskScoringError(f"{role} folder {folder} does not exist or is not a folder")
    masks: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in MASK_SUFFIXES and not path.name.startswith("."):
            masks.setdefault(mask_key(path), []).append(path)
    return masks


def _pair_masks(truth_dir: Path, pred_dir: Path) -> list[tuple[str, Path, Path]]:
    truths = _masks_by_key(truth_dir, "truth")
    preds = _masks_by_key(pred_dir, "prediction")
    if not truths:
        raise MaskScoringError(f"no mask images ({', '.join(MASK_SUFFIXES)}) in truth folder {truth_dir}")
    for masks in (truths, preds):
        for key, paths in masks.items():
            if len(paths) > 1 and key in truths:
                names = ", ".join(p.name for p in paths)
                raise MaskScoringError(f"several masks for {key} in {paths[0].parent}: {names}; keep one")
    missing = [key for key in truths if key not in preds]
    if missing:
        shown = ", ".join(missing[:_MISSING_LISTED]) + (", ..." if len(missing) > _MISSING_LISTED else "")
        raise MaskScoringError(
            f"{len(missing)} of {len(truths)} true masks have no prediction in {pred_dir}: {shown} "
            "(a prediction is matched by the ISIC id in its name, else by the same file stem)"
        )
    return [(key, paths[0], preds[key][0]) for key, paths in sorted(truths.items(), key=lambda kv: kv[1][0].name)]


def score_folders(
    truth_dir: Path, pred_dir: Path, progress: bool = False
) -> tuple[list[tuple[str, dict[str, float]]], dict[str, float]]:
    """Score every true mask in ``truth_dir`` against its prediction in ``pred_dir``, as the ISIC scorer does.

    Returns the per-image scores ``[(image_id, scores), ...]`` in truth file order and their means. Predictions
    without a true mask are ignored; a true mask without a prediction, or a prediction of another size, raises
    ``MaskScoringError``.
    """
    from tqdm import tqdm

    pairs = _pair_masks(Path(truth_dir), Path(pred_dir))
    per_image: list[tuple[str, dict[str, float]]] = []
    # leave=False with a context manager: the bar is wiped on success and on error, so an error stays one clean line.
    with tqdm(total=len(pairs), desc="scoring masks", unit="mask", disable=not progress, leave=False) as bar:
        for key, truth_path, pred_path in pairs:
            truth = read_mask(truth_path)
            pred = read_mask(pred_path)
            if pred.shape != truth.shape:
                raise MaskScoringError(
                    f"prediction {pred_path} is {pred.shape[1]}x{pred.shape[0]} (WxH) but its true mask is "
                    f"{truth.shape[1]}x{truth.shape[0]}; predict at the original image size"
                )
            per_image.append((key, image_scores(pred > GREY_THRESHOLD, truth > GREY_THRESHOLD)))
            bar.update()
    logger.info("scored %d masks from %s against %s", len(per_image), pred_dir, truth_dir)
    return per_image, mean_scores([scores for _, scores in per_image])
