"""The learned vote starts at the mean vote and moves only where the data says so: synthetic probability tables where
per-class, per-backbone weights help (one backbone pure noise, one good only on the rare classes), and tables where
every backbone is equally good (nothing to learn)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from dermpipe.ensemble.baselines import mean_vote
from dermpipe.ensemble.config import MetaConfig
from dermpipe.ensemble.meta import (
    LOG_FLOOR,
    LocallyConnectedVote,
    candidate_settings,
    fit_meta,
    meta_logits,
    select_meta_settings,
    softmax,
)

PRIORS = np.array([0.45, 0.3, 0.1, 0.08, 0.07])  # two common classes, three rare ones
FAST = MetaConfig(epochs=150, lr=0.03, cv_folds=3, hidden_grid=(4,), anchor_grid=(1.0, 0.1, 0.01))


def tables(n: int, skills: list[np.ndarray], seed: int, confusion: dict[int, int] | None = None):
    """(n, backbones, classes) probabilities and labels. Backbone b's logits: ``skills[b][y]`` on the true class
    ``y`` plus Gaussian noise; ``confusion`` {backbone: class}: that backbone also puts its skill on that class for
    the images of the classes it is not skilled on (a confident, systematic mistake)."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(len(PRIORS), size=n, p=PRIORS)
    stacked = []
    for b, skill in enumerate(skills):
        logits = rng.normal(0.0, 1.0, (n, len(PRIORS)))
        logits[np.arange(n), labels] += skill[labels]
        if confusion and b in confusion:
            unskilled = skill[labels] == 0
            logits[unskilled, confusion[b]] += 3.0
        stacked.append(softmax(logits))
    return np.stack(stacked, axis=1).astype(np.float32), labels


def _bacc(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(balanced_accuracy_score(labels, probs.argmax(1)))


def _learned(fit_probs, fit_labels, test_probs, cfg=FAST):
    selection = select_meta_settings(fit_probs, fit_labels, cfg)
    model = fit_meta(fit_probs, fit_labels, cfg, cfg.seed, selection.settings)
    return softmax(meta_logits(model, test_probs)), selection


@pytest.mark.parametrize("inputs", ["log_probs", "probs"])
def test_the_start_is_the_mean_vote(inputs):
    probs, _ = tables(300, [np.full(5, 1.5)] * 3, seed=1)
    model = LocallyConnectedVote(3, 5, hidden=6, inputs=inputs)
    model.start_at_mean_vote(torch.Generator().manual_seed(0))
    out = softmax(meta_logits(model, probs))
    if inputs == "log_probs":  # the log-probability average: the normalised geometric mean, exactly
        geometric = np.exp(np.log(np.clip(probs, LOG_FLOOR, None)).mean(axis=1))
        np.testing.assert_allclose(out, geometric / geometric.sum(1, keepdims=True), atol=1e-5)
    else:  # the mean probability, scaled: the mean vote's decisions
        np.testing.assert_array_equal(out.argmax(1), mean_vote(probs).argmax(1))
    assert torch.count_nonzero(model.w1[:, 1:, :]) > 0  # the other hidden units can learn


def test_a_noise_backbone_and_a_rare_class_specialist_are_learned(tmp_path):
    common, rare = np.array([3.0, 3.0, 0, 0, 0]), np.array([0, 0, 3.0, 3.0, 3.0])
    skills = [np.zeros(5), common, rare]  # backbone 0: pure noise; 1: common classes only; 2: rare classes only
    confusion = {0: 0, 1: 0}  # the noise backbone and the common-class one call unknown images class 0, confidently
    fit_probs, fit_labels = tables(1000, skills, seed=2, confusion=confusion)
    test_probs, test_labels = tables(4000, skills, seed=3, confusion=confusion)
    learned, selection = _learned(fit_probs, fit_labels, test_probs)
    mean = _bacc(mean_vote(test_probs), test_labels)
    assert not selection.settings.stays  # cross-validation saw the gain and left the mean vote
    assert _bacc(learned, test_labels) > mean + 0.05, (_bacc(learned, test_labels), mean)


def test_with_nothing_to_learn_it_stays_within_noise_of_the_mean_vote():
    skills = [np.full(5, 1.5)] * 5  # five equally good backbones, independent errors
    fit_probs, fit_labels = tables(200, skills, seed=4)
    test_probs, test_labels = tables(4000, skills, seed=5)
    learned, selection = _learned(fit_probs, fit_labels, test_probs)
    assert abs(_bacc(learned, test_labels) - _bacc(mean_vote(test_probs), test_labels)) < 0.015
    assert selection.settings.stays  # no learned candidate beat the mean vote by more than prefer_simpler_within
    chosen = [row for row in selection.scores if row["chosen"]]
    assert len(chosen) == 1 and chosen[0]["anchor"] == "inf"


def test_candidates_are_simplest_first_and_the_seed_form_is_kept():
    cfg = MetaConfig(hidden_grid=(20, 4), anchor_grid=(0.01, 1.0), inputs_grid=("log_probs",))
    described = [(s.anchor, s.hidden) for s in candidate_settings(cfg)]
    assert described == [(float("inf"), 4), (1.0, 4), (1.0, 20), (0.01, 4), (0.01, 20)]
    seed_form = MetaConfig(init="random", sigmoid_output=True, hidden_grid=(20,), weight_decay_grid=(1e-3,),
                           inputs_grid=("probs",))  # fmt: skip
    assert [(s.anchor, s.hidden, s.weight_decay) for s in candidate_settings(seed_form)] == [(None, 20, 1e-3)]
    with pytest.raises(ValueError, match="init=random"):
        MetaConfig(sigmoid_output=True)


def test_a_strong_anchor_holds_the_weights_near_the_start():
    skills = [np.zeros(5), np.array([3.0, 3.0, 0, 0, 0]), np.array([0, 0, 3.0, 3.0, 3.0])]
    probs, labels = tables(400, skills, seed=6, confusion={0: 0, 1: 0})
    moved = {}
    for anchor in (1.0, 0.001):
        settings = candidate_settings(MetaConfig(hidden_grid=(4,), anchor_grid=(anchor,), inputs_grid=("log_probs",)))
        model = fit_meta(probs, labels, FAST, 0, settings[1])
        start = LocallyConnectedVote(3, 5, 4, inputs="log_probs")
        start.start_at_mean_vote(torch.Generator().manual_seed(0))
        pairs = zip(model.parameters(), start.parameters())
        moved[anchor] = sum(float(((p.detach() - q.detach()) ** 2).sum()) for p, q in pairs)
    assert moved[1.0] < moved[0.001] / 10


def test_a_cv_gain_within_one_standard_error_keeps_the_simpler_candidate():
    from dermpipe.ensemble.meta import _choose

    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(3), 200)
    simple = np.where(rng.random(labels.size) < 0.4, rng.integers(0, 3, labels.size), labels)
    wrong, right = rng.permutation(np.flatnonzero(simple != labels)), rng.permutation(np.flatnonzero(simple == labels))

    def results(mends: int, breaks: int) -> list:
        """The simple candidate and a learned one that mends some of its errors and makes new ones."""
        other = simple.copy()
        other[wrong[:mends]] = labels[wrong[:mends]]
        other[right[:breaks]] = (labels[right[:breaks]] + 1) % 3
        return [(float(balanced_accuracy_score(labels, p)), 1.0, np.eye(3)[p]) for p in (simple, other)]

    small, large = results(30, 24), results(80, 20)
    assert small[1][0] - small[0][0] > 0.005  # a gain above the fixed margin...
    assert _choose(small, labels, MetaConfig(selection_se=0.0)) == 1
    assert _choose(small, labels, MetaConfig()) == 0  # ...but within one bootstrap standard error: not moved
    assert _choose(large, labels, MetaConfig()) == 1  # a gain well beyond the noise moves it
    assert _choose(small, labels, MetaConfig(init="random")) == 1  # seed 004's form: the best, as it was
