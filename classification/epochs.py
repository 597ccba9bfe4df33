"""One epoch of classifier training for the shared loop: the optimiser, the balanced batches, the frozen or unfrozen
phase, validation."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, SubsetRandomSampler

from dermpipe.classification.backbones import (
    LesionClassifier,
    checkpoint_metadata,
)
from dermpipe.classification.config import ClassificationConfig, effective_batchnorm, effective_freeze_epochs
from dermpipe.classification.evaluation import ProbabilityScorer, TrainScorer
from dermpipe.data.balance import balance_summary, hybrid_indices, weighted_sampler
from dermpipe.data.loaders import ClassificationDataset, end_with_parent, seed_worker
from dermpipe.engine.checkpoint import (
    save_checkpoint,
)
from dermpipe.engine.loop import (
    epoch_seed,
    evaluate,
)
from dermpipe.engine.run import Run

logger = logging.getLogger(__name__)


METRIC_COLUMNS = (
    "epoch",
    "phase",
    "lr",
    "train_loss",
    "train_balanced_accuracy",
    "val_loss",
    "val_balanced_accuracy",
    "val_accuracy",
    "val_macro_f1",
    "val_macro_auc",
    "images_per_sec",
    "sec",
)


def build_optimizer(model: LesionClassifier, cfg: ClassificationConfig) -> torch.optim.Optimizer:
    """AdamW or SGD with momentum; no weight decay on biases and normalisation weights (as timm does)."""
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": []}
    for p in model.parameters():
        groups["no_decay" if p.ndim <= 1 else "decay"].append(p)
    params = [
        {"params": groups["decay"], "weight_decay": cfg.train.weight_decay},
        {"params": groups["no_decay"], "weight_decay": 0.0},
    ]
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.train.lr, momentum=cfg.train.momentum, nesterov=True)
    return torch.optim.AdamW(params, lr=cfg.train.lr)


def _epoch_batches(
    dataset: ClassificationDataset,
    labels: np.ndarray,
    cfg: ClassificationConfig,
    epoch: int,
    features: np.ndarray | None,
    pin: bool,
) -> DataLoader:
    """This epoch's loader; every random draw is seeded from (seed, epoch), so a resumed run repeats it exactly."""
    seed = epoch_seed(cfg.run.seed, epoch)
    balance = cfg.data.balance
    generator = torch.Generator().manual_seed(seed)
    sampler: Any = None
    if balance.sampler == "weighted":
        sampler = weighted_sampler(labels, seed=seed)
    elif balance.sampler == "hybrid":
        sampler = SubsetRandomSampler(hybrid_indices(labels, features, balance, seed).tolist(), generator=generator)
    n = len(sampler) if sampler is not None else len(dataset)
    dataset.transform.set_random_seed(seed)
    return DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator if sampler is None else None,
        drop_last=n > cfg.train.batch_size,  # a last batch of one image breaks BatchNorm
        num_workers=cfg.run.num_workers,
        pin_memory=pin,
        worker_init_fn=seed_worker if cfg.run.num_workers else None,
    )


def _thumbnails(dataset: ClassificationDataset, side: int = 8) -> np.ndarray:
    """Tiny colour thumbnails as K-Means features for the hybrid sampler's undersampling."""
    out = []
    for i in range(len(dataset)):
        image, _ = dataset.images.get(i)
        out.append(cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA).reshape(-1) / 255.0)
    return np.asarray(out, dtype=np.float64)


class ClassificationStage:
    """What the engine's loop needs from the classification stage: the head-only phase, balanced batches, scoring."""

    def __init__(
        self,
        cfg: ClassificationConfig,
        run: Run,
        model: LesionClassifier,
        train_ds: ClassificationDataset,
        monitor_ds: ClassificationDataset,
        classes: Sequence[str],
        meta_extra: Mapping[str, Any],
    ) -> None:
        self.cfg, self.run, self.model, self.train_ds = cfg, run, model, train_ds
        self.classes, self.meta_extra = list(classes), dict(meta_extra)
        self.batchnorm = effective_batchnorm(cfg)
        self.epoch, self.frozen = 0, False
        balance = cfg.data.balance
        self.labels = train_ds.labels
        self.features = _thumbnails(train_ds) if balance.sampler == "hybrid" and balance.undersample_target else None
        self.pin = run.device.type == "cuda"
        self.first = _epoch_batches(train_ds, self.labels, cfg, 0, self.features, self.pin)
        if balance.sampler == "hybrid":
            counts = np.bincount(self.labels, minlength=len(classes))
            after = np.bincount(self.labels[np.asarray(self.first.sampler.indices)], minlength=len(classes))
            logger.info("hybrid sampling per epoch:\n%s", balance_summary(classes, counts.tolist(), after.tolist()))
        t = cfg.train
        self.monitor = DataLoader(
            monitor_ds, batch_size=t.eval_batch_size or 2 * t.batch_size, num_workers=cfg.run.num_workers,
            pin_memory=self.pin, worker_init_fn=end_with_parent,
        )  # fmt: skip

    def start_epoch(self, epoch: int) -> dict[str, Any]:
        frozen = epoch < effective_freeze_epochs(self.cfg)
        self.model.set_backbone_trainable(not frozen)
        self.model.hold_batchnorm(self.batchnorm == "frozen")
        self.epoch, self.frozen = epoch, frozen
        return {"phase": "head" if frozen else "all"}

    def batches(self, epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        if epoch == 0:
            return self.first
        return _epoch_batches(self.train_ds, self.labels, self.cfg, epoch, self.features, self.pin)

    def train_scorer(self) -> TrainScorer:
        return TrainScorer()

    def validate(self, model: nn.Module) -> dict[str, Any]:
        if self.batchnorm == "reestimate" and not self.frozen:
            self.reestimate_batchnorm(model)
        return evaluate(model, self.monitor, self.run, ProbabilityScorer(self.classes))

    def reestimate_batchnorm(self, model: nn.Module) -> None:
        """Recompute the BatchNorm running statistics as plain means over ``train.bn_reestimate_batches`` training
        batches of this epoch (torch's ``update_bn``, as for SWA), so evaluation sees the statistics of the weights it
        evaluates rather than a slow moving average over the weights of the whole epoch."""
        batches = _epoch_batches(self.train_ds, self.labels, self.cfg, self.epoch, self.features, self.pin)
        images = (self.run.batch(x, y)[0] for x, y in itertools.islice(batches, self.cfg.train.bn_reestimate_batches))
        with torch.no_grad():
            update_bn(images, model)

    def save(self, path: Path, model: nn.Module, row: Mapping[str, Any]) -> None:
        meta = checkpoint_metadata(
            model,
            self.classes,
            **self.meta_extra,
            epoch=row["epoch"],
            val_balanced_accuracy=row["val_balanced_accuracy"],
        )
        save_checkpoint(path, model, meta)
