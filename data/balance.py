"""Class balancing: inverse or effective-number weights (Cui et al. CVPR 2019), samplers, hybrid K-Means resampling."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler

logger = logging.getLogger(__name__)

WEIGHT_METHODS: tuple[str, ...] = ("none", "inverse", "effective")
SAMPLERS: tuple[str, ...] = ("none", "weighted", "hybrid")


@dataclass(frozen=True)
class BalanceConfig:
    """How the training set is balanced: a loss weighting, and optionally a sampler.

    ``hybrid`` follows the dynamic hybrid sampling of E2E-DenseNetSkin: it first cuts each class above
    ``undersample_target`` down to it with K-Means (keeping the class's cluster proportions, so its variety survives),
    then repeats each class below ``oversample_target`` up to it. Calling :func:`hybrid_indices` with a new seed each
    epoch draws a fresh subset (the "dynamic" part).
    """

    class_weights: str = "inverse"  # none | inverse | effective
    effective_beta: float = 0.999
    sampler: str = "none"  # none | weighted | hybrid
    oversample_target: int = 0  # 0 = off; classes with fewer samples are repeated up to this count
    undersample_target: int = 0  # 0 = off; classes with more samples are cut to this count by K-Means
    kmeans_clusters: int = 8

    def __post_init__(self) -> None:
        if self.class_weights not in WEIGHT_METHODS:
            raise ValueError(
                f"balance setting class_weights {self.class_weights!r} is not one of {list(WEIGHT_METHODS)}"
            )
        if self.sampler not in SAMPLERS:
            raise ValueError(f"balance setting sampler {self.sampler!r} is not one of {list(SAMPLERS)}")
        if not 0.0 <= self.effective_beta < 1.0:
            raise ValueError(f"balance setting effective_beta must be in [0, 1), got {self.effective_beta}")
        if self.oversample_target < 0 or self.undersample_target < 0:
            raise ValueError("balance settings oversample_target and undersample_target must be >= 0 (0 = off)")
        if self.kmeans_clusters < 1:
            raise ValueError(f"balance setting kmeans_clusters must be >= 1, got {self.kmeans_clusters}")
        if self.undersample_target and self.oversample_target > self.undersample_target:
            raise ValueError(
                f"balance setting oversample_target ({self.oversample_target}) exceeds undersample_target "
                f"({self.undersample_target}): minorities would end up larger than the majorities; lower it"
            )


def _check_labels(labels: np.ndarray | Sequence[int]) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array of class indices, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    unlabelled = int((labels < 0).sum())
    if unlabelled:
        raise ValueError(
            f"{unlabelled} of {labels.size} labels are -1 (unlabelled): balance only labelled rows "
            "(Manifest.select(labelled=True))"
        )
    return labels.astype(np.int64)


def class_weights(counts: Sequence[int], method: str = "inverse", beta: float = 0.999) -> np.ndarray:
    """Per-class loss weights, scaled so they average 1 over the samples (``sum(w_c * n_c) == N``).

    ``inverse`` weighs a class by 1/n; ``effective`` by the inverse effective number of samples, (1 - beta) /
    (1 - beta**n) (Cui et al. 2019), which lies between uniform (beta = 0) and inverse frequency (beta -> 1);
    ``none`` is uniform. A class without samples gets weight 0.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0 or (counts < 0).any() or counts.sum() <= 0:
        raise ValueError(f"class counts must be non-negative with at least one sample, got {counts.tolist()}")
    if method not in WEIGHT_METHODS:
        raise ValueError(f"unknown class weighting {method!r}: choose one of {list(WEIGHT_METHODS)}")
    present = counts > 0
    raw = np.zeros_like(counts)
    if method == "none":
        raw[present] = 1.0
    elif method == "inverse":
        raw[present] = 1.0 / counts[present]
    else:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"effective-number beta must be in [0, 1), got {beta}")
        raw[present] = (1.0 - beta) / (1.0 - np.power(beta, counts[present]))
    return raw * counts.sum() / float((raw * counts).sum())


def oversample_indices(labels: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted row indices in which every class with fewer than ``target`` rows is repeated up to exactly ``target``.

    Whole copies of the class come first, the remainder is a random subset without repeats; every original row stays,
    and classes already at or above ``target`` are left as they are. ``target`` 0 switches it off.
    """
    labels = _check_labels(labels)
    if target < 0:
        raise ValueError(f"oversample target must be >= 0 (0 = off), got {target}")
    parts = [np.arange(labels.size)]
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        missing = target - members.size
        if missing <= 0:
            continue
        parts.append(np.tile(members, missing // members.size))
        parts.append(rng.choice(members, size=missing % members.size, replace=False))
    return np.sort(np.concatenate(parts)).astype(np.int64)


def _proportional_quotas(sizes: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` over groups in proportion to ``sizes`` (largest remainder), never above a group's size."""
    exact = sizes * (total / sizes.sum())
    quotas = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - quotas), kind="stable")
    for index in order[: total - int(quotas.sum())]:
        quotas[index] += 1
    return np.minimum(quotas, sizes)


def kmeans_undersample_indices(
    labels: np.ndarray, features: np.ndarray, target: int, n_clusters: int, rng_seed: int
) -> np.ndarray:
    """Sorted row indices with each class above ``target`` cut to exactly ``target`` rows, keeping its variety.

    Per such class, K-Means groups its rows by ``features`` (N x D, e.g. image embeddings or thumbnails); each cluster
    keeps a random share proportional to its size, so the cluster proportions of the class survive. Smaller classes
    keep every row. ``target`` 0 switches it off.
    """
    labels = _check_labels(labels)
    features = np.asarray(features, dtype=np.float64)
    if features.ndim == 1:
        features = features[:, None]
    if features.ndim != 2 or features.shape[0] != labels.size:
        raise ValueError(f"features must be N x D with N = {labels.size} rows (one per label), got {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN or infinite values: K-Means cannot cluster them")
    if target < 0 or n_clusters < 1:
        raise ValueError(f"undersample target must be >= 0 and n_clusters >= 1, got {target} and {n_clusters}")
    if target == 0:
        return np.arange(labels.size, dtype=np.int64)
    rng = np.random.default_rng(rng_seed)
    kept = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if members.size <= target:
            kept.append(members)
            continue
        clusters = min(n_clusters, target, members.size)
        from sklearn.cluster import KMeans  # imported here: scikit-learn costs a second at every start

        assignment = KMeans(n_clusters=clusters, n_init="auto", random_state=rng_seed).fit_predict(features[members])
        sizes = np.bincount(assignment, minlength=clusters)
        quotas = _proportional_quotas(sizes, target)
        for cluster, quota in enumerate(quotas):
            if quota:
                kept.append(rng.choice(members[assignment == cluster], size=int(quota), replace=False))
        logger.debug(
            "class %d: %d -> %d rows from %d clusters of sizes %s", label, members.size, target, clusters, sizes
        )
    return np.sort(np.concatenate(kept)).astype(np.int64)


def hybrid_indices(labels: np.ndarray, features: np.ndarray | None, cfg: BalanceConfig, seed: int) -> np.ndarray:
    """Row indices for one epoch: K-Means undersampling of the majorities, then oversampling of the minorities.

    Pass a different ``seed`` each epoch for a fresh draw. ``features`` are needed only when undersampling is on.
    """
    labels = _check_labels(labels)
    indices = np.arange(labels.size, dtype=np.int64)
    if cfg.undersample_target:
        if features is None:
            raise ValueError("undersample_target needs per-row features for K-Means; pass them or set it to 0")
        indices = kmeans_undersample_indices(labels, features, cfg.undersample_target, cfg.kmeans_clusters, seed)
    if cfg.oversample_target:
        rng = np.random.default_rng(seed)
        indices = indices[oversample_indices(labels[indices], cfg.oversample_target, rng)]
    return indices


def weighted_sampler(
    labels: np.ndarray, num_samples: int | None = None, seed: int = 0
) -> torch.utils.data.WeightedRandomSampler:
    """A sampler drawing rows with probability inversely proportional to their class size (classes about uniform).

    Draws ``num_samples`` rows per epoch (default: as many as there are rows) with replacement.
    """
    labels = _check_labels(labels)
    counts = np.bincount(labels)
    weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(weights, num_samples or labels.size, replacement=True, generator=generator)


def balance_summary(classes: Sequence[str], before: Sequence[int], after: Sequence[int]) -> str:
    """A small text table of rows per class before and after balancing, with the ratio and a total line."""
    if not len(classes) == len(before) == len(after):
        raise ValueError(f"{len(classes)} classes but {len(before)} counts before and {len(after)} after")
    rows = [(str(name), int(b), int(a)) for name, b, a in zip(classes, before, after)]
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    width = max(5, *(len(r[0]) for r in rows))
    lines = [f"{'class':<{width}}  {'before':>8}  {'after':>8}  {'ratio':>6}"]
    for name, b, a in rows:
        ratio = f"{a / b:.2f}" if b else "-"
        lines.append(f"{name:<{width}}  {b:>8}  {a:>8}  {ratio:>6}")
    return "\n".join(lines)
