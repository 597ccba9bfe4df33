"""Tests for data.balance: class weights, oversampling, K-Means undersampling, hybrid and weighted sampling."""

from __future__ import annotations

import numpy as np
import pytest

from dermpipe.data.balance import (
    BalanceConfig,
    balance_summary,
    class_weights,
    hybrid_indices,
    kmeans_undersample_indices,
    oversample_indices,
    weighted_sampler,
)


def _labels(counts: list[int], seed: int = 0) -> np.ndarray:
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    return np.random.default_rng(seed).permutation(labels)


def test_inverse_weights_are_inverse_to_frequency_and_average_one() -> None:
    counts = [600, 300, 100, 0]
    weights = class_weights(counts, "inverse")
    assert weights[3] == 0.0
    assert weights[0] * 600 == pytest.approx(weights[1] * 300) == pytest.approx(weights[2] * 100)
    assert float(np.dot(weights, counts)) == pytest.approx(sum(counts))
    uniform = class_weights(counts, "none")
    assert uniform.tolist() == [1.0, 1.0, 1.0, 0.0]


def test_effective_number_weights_lie_between_uniform_and_inverse() -> None:
    counts = [1000, 100, 10]
    inverse = class_weights(counts, "inverse")
    for beta in (0.9, 0.99, 0.999):
        effective = class_weights(counts, "effective", beta=beta)
        assert float(np.dot(effective, counts)) == pytest.approx(sum(counts))
        assert effective[0] < effective[1] < effective[2]  # rarer classes weigh more
        ratio = effective[2] / effective[0]
        assert 1.0 < ratio < inverse[2] / inverse[0]
    # beta = 0 is uniform; beta close to 1 approaches inverse frequency.
    assert np.allclose(class_weights(counts, "effective", beta=0.0), 1.0)
    near_inverse = class_weights(counts, "effective", beta=0.999999)
    assert np.allclose(near_inverse, inverse, rtol=0.01)


def test_class_weights_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown class weighting 'inverted'"):
        class_weights([3, 4], "inverted")
    with pytest.raises(ValueError, match="non-negative"):
        class_weights([0, 0])
    with pytest.raises(ValueError, match="beta"):
        class_weights([3, 4], "effective", beta=1.0)


def test_oversampling_reaches_target_for_minorities_only() -> None:
    labels = _labels([50, 7, 3, 20])
    indices = oversample_indices(labels, 20, np.random.default_rng(0))
    counts = np.bincount(labels[indices], minlength=4)
    assert counts.tolist() == [50, 20, 20, 20]
    assert set(np.arange(labels.size)) <= set(indices.tolist())  # every original row is kept
    # The 7-row class: 20 = 2 whole copies + 6 of its rows once more, so no row appears more than 3 times.
    minority = np.bincount(indices[labels[indices] == 1])
    assert minority.max() <= 3 and minority[minority > 0].min() >= 2
    assert np.array_equal(oversample_indices(labels, 0, np.random.default_rng(0)), np.arange(labels.size))


def _two_cluster_features(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Features of one class in two well-separated blobs holding 80% and 20% of its rows; returns (features, blob)."""
    blob = (np.arange(n) >= int(0.8 * n)).astype(int)
    centres = np.array([[0.0, 0.0, 0.0], [50.0, 50.0, 50.0]])
    return centres[blob] + rng.normal(0.0, 1.0, size=(n, 3)), blob


def test_kmeans_undersampling_hits_target_and_keeps_cluster_proportions() -> None:
    rng = np.random.default_rng(1)
    majority_features, blob = _two_cluster_features(500, rng)
    minority_features = rng.normal(100.0, 1.0, size=(40, 3))
    labels = np.concatenate([np.zeros(500, dtype=int), np.ones(40, dtype=int)])
    features = np.concatenate([majority_features, minority_features])

    kept = kmeans_undersample_indices(labels, features, target=100, n_clusters=2, rng_seed=0)
    assert np.bincount(labels[kept]).tolist() == [100, 40]
    assert len(set(kept.tolist())) == kept.size  # no repeats: it only removes rows
    assert set(np.flatnonzero(labels == 1).tolist()) <= set(kept.tolist())
    kept_blob = blob[kept[labels[kept] == 0]]
    assert np.bincount(kept_blob).tolist() == [80, 20]
    # More clusters than blobs still keep the 80/20 split closely.
    kept8 = kmeans_undersample_indices(labels, features, target=100, n_clusters=8, rng_seed=0)
    assert abs(int(np.bincount(blob[kept8[labels[kept8] == 0]])[0]) - 80) <= 2
    assert np.array_equal(kept, kmeans_undersample_indices(labels, features, 100, 2, rng_seed=0))


def test_kmeans_undersampling_checks_features() -> None:
    labels = np.zeros(10, dtype=int)
    with pytest.raises(ValueError, match="N x D"):
        kmeans_undersample_indices(labels, np.zeros((9, 2)), 5, 2, 0)
    features = np.zeros((10, 2))
    features[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        kmeans_undersample_indices(labels, features, 5, 2, 0)


def test_hybrid_undersamples_then_oversamples_and_changes_with_seed() -> None:
    rng = np.random.default_rng(2)
    labels = _labels([300, 60, 8])
    features = rng.normal(size=(labels.size, 4))
    cfg = BalanceConfig(sampler="hybrid", undersample_target=100, oversample_target=50, kmeans_clusters=4)
    indices = hybrid_indices(labels, features, cfg, seed=0)
    assert np.bincount(labels[indices]).tolist() == [100, 60, 50]
    again = hybrid_indices(labels, features, cfg, seed=0)
    other_epoch = hybrid_indices(labels, features, cfg, seed=1)
    assert np.array_equal(indices, again)
    assert not np.array_equal(indices, other_epoch)
    with pytest.raises(ValueError, match="features"):
        hybrid_indices(labels, None, cfg, seed=0)
    oversample_only = BalanceConfig(oversample_target=50)
    assert np.bincount(labels[hybrid_indices(labels, None, oversample_only, seed=0)]).tolist() == [300, 60, 50]


def test_weighted_sampler_draws_classes_about_uniformly() -> None:
    labels = _labels([900, 90, 10])
    sampler = weighted_sampler(labels, num_samples=6000, seed=0)
    drawn = labels[np.fromiter(iter(sampler), dtype=np.int64)]
    shares = np.bincount(drawn, minlength=3) / drawn.size
    assert np.allclose(shares, 1 / 3, atol=0.04)
    assert len(weighted_sampler(labels)) == labels.size
    same = np.fromiter(iter(weighted_sampler(labels, 100, seed=5)), dtype=np.int64)
    assert np.array_equal(same, np.fromiter(iter(weighted_sampler(labels, 100, seed=5)), dtype=np.int64))


def test_unlabelled_rows_are_refused_clearly() -> None:
    labels = np.array([0, 1, -1, 1, -1])
    for call in (
        lambda: oversample_indices(labels, 5, np.random.default_rng(0)),
        lambda: kmeans_undersample_indices(labels, np.zeros((5, 2)), 1, 2, 0),
        lambda: weighted_sampler(labels),
        lambda: hybrid_indices(labels, None, BalanceConfig(oversample_target=3), 0),
    ):
        with pytest.raises(ValueError, match=r"2 of 5 labels are -1 \(unlabelled\).*labelled=True"):
            call()


def test_balance_config_validates() -> None:
    assert BalanceConfig().class_weights == "inverse"
    with pytest.raises(ValueError, match="sampler 'hybird'"):
        BalanceConfig(sampler="hybird")
    with pytest.raises(ValueError, match="oversample_target"):
        BalanceConfig(undersample_target=100, oversample_target=200)


def test_balance_summary_table() -> None:
    table = balance_summary(["nv", "mel", "df"], [500, 100, 10], [100, 100, 50])
    lines = table.splitlines()
    assert len(lines) == 5
    assert lines[0].split() == ["class", "before", "after", "ratio"]
    assert lines[1].split() == ["nv", "500", "100", "0.20"]
    assert lines[3].split() == ["df", "10", "50", "5.00"]
    assert lines[4].split() == ["total", "610", "250", "0.41"]
    with pytest.raises(ValueError):
        balance_summary(["nv"], [1, 2], [1, 2])
