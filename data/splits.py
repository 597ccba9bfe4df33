"""Leak-free splits: stratified by class, grouped by lesion or patient, so no lesion sits on two sides."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from dermpipe.data.manifest import Manifest, ManifestError

logger = logging.getLogger(__name__)


def _groups(manifest: Manifest) -> list[str]:
    # An image without a group id is its own group.
    return [r.get("group") or f"__image__{r['image_id']}" for r in manifest.rows]


def _one_fold(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of about ``fraction`` of the rows, stratified by label and whole groups only."""
    n_splits = max(2, round(1.0 / fraction))
    n_groups = len(set(groups.tolist()))
    if n_groups < n_splits:
        raise ManifestError(f"cannot split {n_groups} lesion groups into a fraction {fraction:.2f}: too few groups")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # rare classes cannot reach every side; the split summary shows the counts
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        _, held = next(iter(splitter.split(np.zeros(len(labels)), labels, groups)))
    mask = np.zeros(len(labels), dtype=bool)
    mask[held] = True
    return mask


def assign_splits(
    manifest: Manifest,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    keep_existing: bool = True,
) -> Manifest:
    """Fill the ``split`` column with train/val/test.

    Rows that already carry an official split keep it when ``keep_existing``; the others are split stratified by
    label (unlabelled rows form their own stratum) and grouped by ``group``.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ManifestError(f"split fractions {tuple(fractions)} must be three non-negative numbers summing to 1")
    splits = [r.get("split", "") if keep_existing else "" for r in manifest.rows]
    todo = np.array([s == "" for s in splits])
    if not todo.any():
        return manifest
    labels = np.array([r.get("label", "") or "__unlabelled__" for r in manifest.rows])[todo]
    groups = np.array(_groups(manifest))[todo]
    idx = np.flatnonzero(todo)
    _, val_frac, test_frac = fractions
    result = np.full(len(idx), "train", dtype=object)
    remaining = np.ones(len(idx), dtype=bool)
    if test_frac > 0:
        test = _one_fold(labels, groups, test_frac, seed)
        result[test] = "test"
        remaining &= ~test
    if val_frac > 0:
        rel = val_frac / max(1e-9, 1.0 - test_frac)
        sub = np.flatnonzero(remaining)
        val = _one_fold(labels[sub], groups[sub], rel, seed + 1)
        result[sub[val]] = "val"
    for i, s in zip(idx, result):
        splits[i] = str(s)
    check_grouping(manifest.with_column("split", splits), "split")
    return manifest.with_column("split", splits)


def assign_folds(manifest: Manifest, k: int, seed: int = 0, column: str = "fold") -> Manifest:
    """Add a ``fold`` column (0..k-1) over the training rows, stratified and grouped; other rows get ''."""
    if k < 2:
        raise ManifestError(f"--folds must be at least 2, got {k}")
    train = np.array([r.get("split", "") == "train" for r in manifest.rows])
    idx = np.flatnonzero(train)
    labels = np.array([r.get("label", "") or "__unlabelled__" for r in manifest.rows])[idx]
    groups = np.array(_groups(manifest))[idx]
    if len(set(groups.tolist())) < k:
        raise ManifestError(f"cannot make {k} folds from {len(set(groups.tolist()))} lesion groups")
    folds = [""] * len(manifest.rows)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for fold, (_, held) in enumerate(splitter.split(np.zeros(len(idx)), labels, groups)):
            for i in idx[held]:
                folds[i] = str(fold)
    out = manifest.with_column(column, folds)
    check_grouping(out.select("train"), column)
    return out


def check_grouping(manifest: Manifest, column: str = "split") -> None:
    """Raise if any lesion group has rows on two sides of ``column``."""
    seen: dict[str, str] = {}
    for row, group in zip(manifest.rows, _groups(manifest)):
        side = row.get(column, "")
        if seen.setdefault(group, side) != side:
            raise ManifestError(f"lesion group {group!r} is on both sides of {column}: {seen[group]!r} and {side!r}")
