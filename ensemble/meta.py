"""The locally connected meta-network vote (seed 004's LocallyConnected1D pair), its training and CV-chosen settings."""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dermpipe.engine.checkpoint import load_checkpoint, load_weights, save_checkpoint
from dermpipe.ensemble.config import MetaConfig
from dermpipe.ensemble.evaluation import bootstrap_balanced_accuracy

logger = logging.getLogger(__name__)

STAGE = "ensemble"
ARCHITECTURE = "LocallyConnectedVote"
INPUTS = ("probs", "log_probs")
SELECTION_RESAMPLES = 500  # paired bootstrap resamples of the fit set behind meta.selection_se
LOG_FLOOR = 1.0e-6  # probabilities written as 0 in a CSV would give -inf log-probabilities


class LocallyConnectedVote(nn.Module):
    """Per class c, a tiny MLP over the backbones' probabilities for c alone, then a softmax across classes.

    ``hidden[n, c] = relu(W1[c] @ p[n, :, c] + b1[c])`` with ``W1`` of shape (classes, hidden, backbones), then
    ``logit[n, c] = W2[c] . hidden[n, c] + b2[c]``: no weight is shared between classes (Keras LocallyConnected1D with
    kernel size 1, as seed 004). ``forward`` returns logits; ``predict_proba`` applies the softmax.

    Seed 004 squashed each class score through a sigmoid before the softmax. That caps the top probability at
    e / (e + C - 1) (0.31 for seven classes), so its outputs cannot be calibrated and log-loss training saturates;
    it is off by default and kept as ``sigmoid_output`` to reproduce the original.

    ``inputs="log_probs"`` feeds each MLP log-probabilities instead (floored at ``LOG_FLOOR``, as logistic stacking
    does): a backbone's 0.001 and 0.01 are far apart on that scale, close on the probability scale.
    """

    def __init__(
        self,
        n_backbones: int,
        n_classes: int,
        hidden: int = 20,
        sigmoid_output: bool = False,
        inputs: str = "probs",
    ) -> None:
        super().__init__()
        if inputs not in INPUTS:
            raise ValueError(f"meta-network inputs must be one of {INPUTS}, got {inputs!r}")
        self.n_backbones, self.n_classes, self.hidden = n_backbones, n_classes, hidden
        self.sigmoid_output, self.inputs = sigmoid_output, inputs
        self.w1 = nn.Parameter(torch.empty(n_classes, hidden, n_backbones))
        self.b1 = nn.Parameter(torch.zeros(n_classes, hidden))
        self.w2 = nn.Parameter(torch.empty(n_classes, hidden))
        self.b2 = nn.Parameter(torch.zeros(n_classes))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Glorot-uniform kernels and zero biases, as Keras initialises LocallyConnected1D."""
        with torch.no_grad():
            limit1 = math.sqrt(6.0 / (self.n_backbones + self.hidden))
            self.w1.uniform_(-limit1, limit1, generator=generator)
            limit2 = math.sqrt(6.0 / (self.hidden + 1))
            self.w2.uniform_(-limit2, limit2, generator=generator)
            self.b1.zero_()
            self.b2.zero_()

    def start_at_mean_vote(self, generator: torch.Generator | None = None) -> None:
        """Weights that compute the mean vote: per class, hidden unit 0 averages the backbones' inputs and is the only
        one the output reads, so the logits are the log-probability average (``log_probs``: softmax gives the
        normalised geometric mean) or the mean probability times ``-log(LOG_FLOOR)`` (``probs``: the same argmax as
        the mean vote). The other hidden units start with small random weights (alive, read with weight 0), so
        training can move away from the mean vote where the data says so."""
        shift = -math.log(LOG_FLOOR)  # log_probs inputs: log p + shift >= 0, so unit 0's ReLU passes the average
        with torch.no_grad():
            limit = 1.0 / self.n_backbones
            self.w1.uniform_(-limit, limit, generator=generator)
            self.w1[:, 0, :] = limit
            self.b1.copy_(self.w1.sum(dim=-1) * shift if self.inputs == "log_probs" else torch.zeros_like(self.b1))
            self.w2.zero_()
            self.w2[:, 0] = 1.0 if self.inputs == "log_probs" else shift
            self.b2.zero_()

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        """(images, backbones, classes) probabilities -> (images, classes) logits."""
        if self.inputs == "log_probs":
            probs = torch.log(probs.clamp_min(LOG_FLOOR))
        hidden = torch.relu(torch.einsum("nbc,chb->nch", probs, self.w1) + self.b1)
        scores = torch.einsum("nch,ch->nc", hidden, self.w2) + self.b2
        return torch.sigmoid(scores) if self.sigmoid_output else scores

    def predict_proba(self, probs: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self(probs), dim=-1)


@dataclass(frozen=True)
class MetaSettings:
    """What cross-validation chooses for the meta-network. ``anchor``: the penalty strength towards the mean-vote start
    (``inf``: not trained, the mean vote itself); ``None``: seed 004's random start with ``weight_decay`` towards
    zero."""

    hidden: int
    weight_decay: float
    inputs: str = "probs"
    anchor: float | None = None

    @property
    def stays(self) -> bool:
        """The mean vote itself: nothing is fitted."""
        return self.anchor is not None and math.isinf(self.anchor)

    def describe(self) -> str:
        if self.anchor is None:
            return f"hidden={self.hidden} weight_decay={self.weight_decay:g} on {self.inputs} (random start)"
        if self.stays:
            return f"the mean vote on {self.inputs} (not moved: cross-validation found no gain in learning)"
        return f"hidden={self.hidden} anchor={self.anchor:g} towards the mean vote on {self.inputs}"

    def record(self) -> dict[str, Any]:
        """As summary.json, the CV table and the checkpoint's metadata give it (``anchor``: a number, ``"inf"``, or
        ``None`` for the random start)."""
        anchor = None if self.anchor is None else ("inf" if self.stays else self.anchor)
        init = "random" if self.anchor is None else "mean_vote"
        return {"hidden": self.hidden, "weight_decay": self.weight_decay, "inputs": self.inputs, "init": init,
                "anchor": anchor}  # fmt: skip


@dataclass(frozen=True)
class MetaSelection:
    """The chosen settings, every candidate's CV scores, and the chosen candidate's out-of-fold logits on the fit set
    (what calibration and the refer threshold are fitted on: held out from the model that made them).
    """

    settings: MetaSettings
    scores: tuple[dict[str, float], ...]
    oof_logits: np.ndarray
    folds: int


def balanced_class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """``n / (classes present * count)`` per class (sklearn's "balanced"), 0 for a class with no image."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(n_classes)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return weights


def selection_score(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(balanced accuracy, log-loss) of (images, classes) probabilities: higher first is better, then lower second."""
    from sklearn.metrics import (
        balanced_accuracy_score,
        log_loss,
    )  # scikit-learn imported when used: a second off every start

    n_classes = probs.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true" on small folds is expected
        bacc = float(balanced_accuracy_score(labels, probs.argmax(1)))
    loss = float(log_loss(labels, np.clip(probs, 1e-12, 1.0), labels=list(range(n_classes))))
    return bacc, loss


def cross_validation_folds(labels: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds inside the fit set; fewer folds when the rarest present class has fewer images than folds."""
    from sklearn.model_selection import StratifiedKFold  # scikit-learn imported when used: a second off every start

    counts = np.bincount(labels)
    rarest = int(counts[counts > 0].min())
    k = max(2, min(folds, rarest))
    if k < folds:
        logger.warning("cross-validation uses %d folds, not %d: the rarest class has %d images", k, folds, rarest)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a class with a single image still goes to one fold
        return list(splitter.split(np.zeros(len(labels)), labels))


@contextlib.contextmanager
def _few_threads(device: torch.device) -> Iterator[None]:
    """One CPU thread while training: on tensors this small, intra-op threads only add synchronisation (ten times
    slower on a busy two-core machine)."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_meta(
    probs: np.ndarray,
    labels: np.ndarray,
    cfg: MetaConfig,
    seed: int | None = None,
    settings: MetaSettings | None = None,
    device: str | torch.device = "cpu",
) -> LocallyConnectedVote:
    """Full-batch training on class-weighted log-loss (so the optimum serves balanced accuracy); deterministic by seed.

    ``probs`` is (images, backbones, classes), ``labels`` class indices (no -1); ``settings`` default to
    ``cfg.hidden``, ``cfg.weight_decay``, ``cfg.inputs`` and, with ``cfg.init: mean_vote``, the strongest anchor.
    From the mean-vote start, Adam minimises the loss plus ``anchor`` times the squared distance of the weights from
    their start; from seed 004's random start, AdamW with ``weight_decay`` towards zero.
    """
    if settings is None:
        anchor = max(cfg.anchor_grid) if cfg.init == "mean_vote" else None
        settings = MetaSettings(cfg.hidden, cfg.weight_decay, cfg.inputs, anchor)
    seed = cfg.seed if seed is None else seed
    n_classes = probs.shape[2]
    model = LocallyConnectedVote(probs.shape[1], n_classes, settings.hidden, cfg.sigmoid_output, settings.inputs)
    generator = torch.Generator().manual_seed(seed)
    if settings.anchor is None:
        model.reset_parameters(generator)
    else:
        model.start_at_mean_vote(generator)
    model.to(device)
    if settings.stays:
        return model.eval()
    x = torch.as_tensor(probs, dtype=torch.float32, device=device)
    y = torch.as_tensor(labels, dtype=torch.int64, device=device)
    weight = torch.as_tensor(balanced_class_weights(labels, n_classes), dtype=torch.float32, device=device)
    start = [p.detach().clone() for p in model.parameters()]
    if settings.anchor is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=settings.weight_decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    model.train()
    with _few_threads(torch.device(device)):
        for _ in range(cfg.epochs):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y, weight=weight)
            if settings.anchor is not None:
                loss = loss + settings.anchor * sum(((p - p0) ** 2).sum() for p, p0 in zip(model.parameters(), start))
            loss.backward()
            optimizer.step()
    model.eval()
    return model


def meta_logits(model: LocallyConnectedVote, probs: np.ndarray) -> np.ndarray:
    """(images, classes) logits of a fitted meta-network, as float64 numpy."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        return model(torch.as_tensor(probs, dtype=torch.float32, device=device)).double().cpu().numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def candidate_settings(cfg: MetaConfig) -> list[MetaSettings]:
    """The settings cross-validation compares, simplest first; an empty grid stands for the single configured value.

    ``init: mean_vote``: the mean vote itself per input kind, then anchor_grid (strongest first) x hidden_grid (fewest
    units first) x inputs_grid. ``init: random``: hidden_grid x weight_decay_grid x inputs_grid (seed 004's form).
    """
    hiddens = sorted(cfg.hidden_grid or (cfg.hidden,))
    inputs = cfg.inputs_grid or (cfg.inputs,)
    if cfg.init == "random":
        decays = cfg.weight_decay_grid or (cfg.weight_decay,)
        return [MetaSettings(h, wd, i) for h, wd, i in itertools.product(hiddens, decays, inputs)]
    stay = [MetaSettings(hiddens[0], 0.0, i, math.inf) for i in inputs]
    anchors = sorted(cfg.anchor_grid, reverse=True)
    return stay + [MetaSettings(h, 0.0, i, a) for a, h, i in itertools.product(anchors, hiddens, inputs)]


def select_meta_settings(
    probs: np.ndarray, labels: np.ndarray, cfg: MetaConfig, device: str | torch.device = "cpu"
) -> MetaSelection:
    """Stratified K-fold CV inside the fit set over ``candidate_settings``, each scored by its pooled out-of-fold
    balanced accuracy (and log-loss); ``_choose`` picks one. Only the fit set is seen here, never the test split.
    """
    folds = cross_validation_folds(labels, cfg.cv_folds, cfg.seed)
    candidates = candidate_settings(cfg)
    results: list[tuple[float, float, np.ndarray]] = []
    scores = []
    for settings in candidates:
        oof = np.zeros((len(labels), probs.shape[2]))
        for train_idx, val_idx in folds:
            model = fit_meta(probs[train_idx], labels[train_idx], cfg, cfg.seed, settings, device)
            oof[val_idx] = meta_logits(model, probs[val_idx])
        bacc, loss = selection_score(softmax(oof), labels)
        results.append((bacc, loss, oof))
        scores.append({**settings.record(), "cv_balanced_accuracy": bacc, "cv_log_loss": loss})
        logger.info("meta-network CV %s: balanced accuracy %.4f, log-loss %.4f", settings.describe(), bacc, loss)
    chosen = _choose(results, labels, cfg)
    logger.info("meta-network chosen by %d-fold CV: %s", len(folds), candidates[chosen].describe())
    for i, row in enumerate(scores):
        row["chosen"] = i == chosen
    return MetaSelection(settings=candidates[chosen], scores=tuple(scores), oof_logits=results[chosen][2],
                         folds=len(folds))  # fmt: skip


def _choose(results: Sequence[tuple[float, float, np.ndarray]], labels: np.ndarray, cfg: MetaConfig) -> int:
    """The index of the chosen candidate. ``init: random``: the best CV balanced accuracy, ties by log-loss.
    ``init: mean_vote``: the first (simplest) candidate within ``prefer_simpler_within`` of the best, or within
    ``selection_se`` bootstrap standard errors of its paired difference to the best (the percentile interval of the
    matching normal confidence, ``erf(se / sqrt 2)``: 68% for one, reaching zero)."""
    best = min(range(len(results)), key=lambda i: (-results[i][0], results[i][1]))
    if cfg.init == "random":
        return best
    near = [r[0] >= results[best][0] - cfg.prefer_simpler_within for r in results]
    if cfg.selection_se > 0 and not all(near):
        predictions = {str(i): r[2].argmax(axis=1) for i, r in enumerate(results)}
        confidence = math.erf(cfg.selection_se / math.sqrt(2.0))
        paired = bootstrap_balanced_accuracy(labels, predictions, str(best), SELECTION_RESAMPLES, confidence, cfg.seed)
        near = [n or paired[str(i)]["delta_high"] >= 0 for i, n in enumerate(near)]
    return near.index(True)


def save_meta(
    path: str | os.PathLike,
    model: LocallyConnectedVote,
    classes: Sequence[str],
    backbones: Sequence[str],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Weights plus what rebuilds the model and checks its inputs: stage, backbone order, classes, hidden width."""
    meta = {
        "stage": STAGE,
        "architecture": ARCHITECTURE,
        "backbones": list(backbones),
        "classes": list(classes),
        "hidden": model.hidden,
        "sigmoid_output": model.sigmoid_output,
        "inputs": model.inputs,
        **(metadata or {}),
    }
    return save_checkpoint(path, model, meta)


def load_meta(
    path: str | os.PathLike,
    backbones: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
) -> tuple[LocallyConnectedVote, dict[str, Any]]:
    """Rebuild a saved meta-network; ``CheckpointError`` when it is not an ensemble checkpoint or was made for
    another backbone order or class list than the ones given.
    """
    expect: dict[str, Any] = {"stage": STAGE}
    if backbones is not None:
        expect["backbones"] = list(backbones)
    if classes is not None:
        expect["classes"] = list(classes)
    state, meta = load_checkpoint(path, expect=expect)
    model = LocallyConnectedVote(
        len(meta["backbones"]),
        len(meta["classes"]),
        int(meta["hidden"]),
        bool(meta.get("sigmoid_output", False)),
        str(meta.get("inputs", "probs")),
    )
    load_weights(model, state, path)
    model.eval()
    return model, meta
