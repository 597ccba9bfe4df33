"""Training one backbone on the lesion crops: freeze-then-unfreeze fine-tuning, early stopping on balanced accuracy.

Plain loops (``train_one_epoch``, ``evaluate``); the run folder gets best/last checkpoints, ``last_state.pt`` for
``--resume``, ``metrics.csv``, learning curves, confusion matrices, Grad-CAM overlays and the probability tables the
ensemble stacks (validation and test, plus out-of-fold ones with K folds).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score
from torch import nn
from torch.utils.data import DataLoader, SubsetRandomSampler
from tqdm import tqdm

from dermpipe.classification.backbones import (
    LesionClassifier,
    build_classifier,
    checkpoint_metadata,
    load_classifier,
    resolve_backbone,
)
from dermpipe.classification.config import ClassificationConfig
from dermpipe.classification.gradcam import save_gradcam_images
from dermpipe.classification.metrics import (
    classification_report,
    format_report,
    per_class_table,
    plot_learning_curves,
    write_confusion_csv,
    write_confusion_png,
)
from dermpipe.classification.probabilities import (
    combined_digest,
    prediction_settings,
    probability_table,
    read_probability_table,
    write_probability_table,
)
from dermpipe.configs.loader import ConfigError, to_dict
from dermpipe.data.augment import build_transform, transform_fingerprint
from dermpipe.data.balance import balance_summary, class_weights, hybrid_indices, weighted_sampler
from dermpipe.data.datasets import ClassificationDataset, epoch_seed, seed_worker
from dermpipe.data.manifest import Manifest, ManifestError
from dermpipe.data.reading import read_image
from dermpipe.data.splits import assign_folds
from dermpipe.engine.cache import StageCache
from dermpipe.engine.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_resume_state,
    load_weights,
    read_metadata,
    save_checkpoint,
    save_resume_state,
    weights_digest,
)
from dermpipe.engine.files import file_digest
from dermpipe.engine.run import Run, append_metrics, optimiser_step, read_metrics, start_run

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
# Settings that change what is predicted or drawn after training, not the trained weights.
_AFTER_TRAINING = ("tta", "gradcam_images", "eval_batch_size", "fold")


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p)^gamma, with class weights and label smoothing."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(logits.float(), dim=1)
        n_classes = logits.shape[1]
        soft = torch.full_like(log_p, self.label_smoothing / n_classes)
        soft.scatter_(1, target[:, None], 1.0 - self.label_smoothing + self.label_smoothing / n_classes)
        per_class = -soft * (1.0 - log_p.exp()).pow(self.gamma) * log_p
        if self.weight is None:
            return per_class.sum(dim=1).mean()
        # Weighted as torch's cross-entropy is, so gamma = 0 gives exactly CrossEntropyLoss(weight, label_smoothing).
        return (per_class * self.weight).sum() / self.weight[target].sum().clamp_min(1e-12)


def build_loss(cfg: ClassificationConfig, weights: torch.Tensor | None) -> nn.Module:
    """Cross-entropy (optionally label-smoothed) or focal loss, weighted per class when ``weights`` is given."""
    t = cfg.train
    if t.loss == "focal":
        return FocalLoss(t.focal_gamma, weights, t.label_smoothing)
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=t.label_smoothing)


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


def lr_factor(step: int, cfg: ClassificationConfig, steps_per_epoch: int) -> float:
    """The learning rate at ``step`` as a fraction of ``train.lr``.

    Warm-up restarts when the backbone is unfrozen, so the new gradients do not wreck the pretrained features; the
    whole network then learns at ``unfreeze_lr_scale`` times the rate. ``cosine``: linear warm-up, then cosine decay
    to 0 over the whole run; ``onecycle``: cosine warm-up from 1/25 of the rate, then cosine decay to 1/10^4 of it.
    """
    t = cfg.train
    total = t.epochs * steps_per_epoch
    unfreeze = t.freeze_epochs * steps_per_epoch if 0 < t.freeze_epochs < t.epochs else 0
    phase_start = unfreeze if step >= unfreeze else 0
    scale = t.unfreeze_lr_scale if unfreeze and step >= unfreeze else 1.0
    warmup = max(int(t.warmup_epochs * steps_per_epoch), 0)
    into_phase = step - phase_start
    progress = min(step / max(total, 1), 1.0)
    if t.schedule == "onecycle":
        if into_phase < warmup:
            start = 1.0 / 25.0
            return scale * (start + (1.0 - start) * 0.5 * (1.0 - math.cos(math.pi * (into_phase + 1) / warmup)))
        return scale * (1e-4 + (1.0 - 1e-4) * 0.5 * (1.0 + math.cos(math.pi * progress)))
    warm = (into_phase + 1) / warmup if into_phase < warmup else 1.0
    return scale * warm * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    run: Run,
    scaler: torch.amp.GradScaler,
    grad_clip: float = 0.0,
    max_steps: int = 0,
    desc: str = "train",
) -> dict[str, float]:
    """One pass over ``batches``: loss, training balanced accuracy, and images per second."""
    model.train()
    # Running sums stay on the device: a .item() per step would stall a GPU at every step.
    loss_sum = torch.zeros((), device=run.device)
    predictions, targets = [], []
    seen = 0
    start = time.perf_counter()
    for step, (images, labels) in enumerate(tqdm(batches, desc=desc, leave=False, disable=None)):
        if max_steps and step >= max_steps:
            break
        images, labels = run.batch(images, labels)
        with run.autocast():
            logits = model(images)
        loss = loss_fn(logits.float(), labels)
        optimiser_step(loss, model, optimizer, scaler, grad_clip)
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach() * labels.shape[0]
        predictions.append(logits.detach().argmax(1))
        targets.append(labels)
        seen += labels.shape[0]
    elapsed = time.perf_counter() - start
    if not seen:
        return {"train_loss": float("nan"), "train_balanced_accuracy": float("nan"), "images_per_sec": 0.0}
    y_pred = torch.cat(predictions).cpu().numpy()
    y_true = torch.cat(targets).cpu().numpy()
    return {
        "train_loss": float(loss_sum) / seen,
        "train_balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "images_per_sec": seen / max(elapsed, 1e-9),
    }


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], run: Run) -> dict[str, Any]:
    """Mean cross-entropy and softmax probabilities over ``loader``; rows labelled -1 count for neither loss nor score.

    The loss here is plain (unweighted, unsmoothed) cross-entropy, comparable across runs with other loss settings.
    """
    model.eval()
    probs, labels = [], []
    for images, target in loader:
        images, target = run.batch(images, target)
        with run.autocast():
            logits = model(images)
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
        labels.append(target.cpu())
    p = torch.cat(probs).numpy() if probs else np.zeros((0, 0), dtype=np.float32)
    y = torch.cat(labels).numpy() if labels else np.zeros(0, dtype=np.int64)
    known = y >= 0
    loss = float(-np.log(np.clip(p[known, y[known]], 1e-12, None)).mean()) if known.any() else float("nan")
    return {"loss": loss, "probs": p, "labels": y}


@dataclass(frozen=True)
class SplitRows:
    """The manifest rows one run uses: what it fits, what it early-stops on, and which tables it writes."""

    fit: Manifest
    monitor: Manifest
    tables: dict[str, Manifest]  # table name (val / test / oof) -> rows
    trained_on: str


def image_column(cfg: ClassificationConfig) -> str:
    return "crop_path" if cfg.data.crops else "image_path"


def read_training_manifest(cfg: ClassificationConfig) -> Manifest:
    """The manifest, checked for labels and the image column this run trains on; K folds assigned if asked for."""
    if not cfg.data.manifest:
        raise ManifestError("no manifest: pass --manifest runs/crops/crops.csv (from `python segmentation/predict.py`)")
    manifest = Manifest.read(cfg.data.manifest)
    column = image_column(cfg)
    if column not in manifest.columns:
        raise ManifestError(
            f"manifest {cfg.data.manifest} has no {column} column: make lesion crops with "
            "`python segmentation/predict.py`, or train on whole images with --no-crop"
        )
    if len(manifest.classes) < 2:
        raise ManifestError(f"manifest {cfg.data.manifest} has {len(manifest.classes)} classes; at least 2 are needed")
    k = cfg.train.folds
    if k:
        existing = {r.get("fold", "") for r in manifest.select("train").rows}
        if existing != {str(i) for i in range(k)}:
            manifest = assign_folds(manifest, k, cfg.run.seed)
    return manifest


def split_rows(manifest: Manifest, cfg: ClassificationConfig, fold: int | None) -> SplitRows:
    """Rows for a plain run (fit train, stop on val) or for fold ``i`` (fit the other folds, stop on fold i)."""
    train = manifest.select("train", labelled=True)
    val = manifest.select("val", labelled=True)
    tables = {"val": val, "test": manifest.select("test")}
    if fold is None:
        fit, monitor, trained_on = train, val, "train"
        if len(val) == 0:
            raise ManifestError(
                f"manifest {cfg.data.manifest} has no labelled val rows for early stopping: split it "
                "(data/splits.py) or train with --folds K"
            )
    else:
        others = sorted({r["fold"] for r in train.rows} - {str(fold)}, key=int)
        fit = replace(train, rows=tuple(r for r in train.rows if r["fold"] != str(fold)))
        monitor = replace(train, rows=tuple(r for r in train.rows if r["fold"] == str(fold)))
        tables = {"oof": monitor, **tables}
        trained_on = f"train folds {','.join(others)} (fold {fold} held out)"
    if len(fit) < 2:
        raise ManifestError(f"manifest {cfg.data.manifest} has {len(fit)} labelled training images; need at least 2")
    missing = [c for c, n in fit.class_counts().items() if n == 0]
    if missing:
        logger.warning("no training images of class %s: the model cannot learn it", ", ".join(missing))
    return SplitRows(fit, monitor, {k: v for k, v in tables.items() if len(v)}, trained_on)


def row_keys(rows: Manifest, column: str) -> list[str]:
    """The content key of each row's input: the crop's stage key, or the file digest of a whole image or crop."""
    return [r["crop_key"] if column == "crop_path" and r.get("crop_key") else file_digest(r[column]) for r in rows.rows]


def training_fingerprint(cfg: ClassificationConfig, manifest_path: str, fold: int | None) -> str:
    """What decides the trained weights: data/model/train settings, seed, manifest bytes and fold."""
    train = {k: v for k, v in asdict(cfg.train).items() if k not in _AFTER_TRAINING}
    payload = {
        "data": to_dict(cfg.data),
        "model": to_dict(cfg.model),
        "train": train,
        "seed": cfg.run.seed,
        "manifest": file_digest(manifest_path),
        "fold": fold,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


def _save_report(report: dict[str, Any], run_dir: Path, name: str, classes: Sequence[str]) -> None:
    (run_dir / f"metrics_{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    write_confusion_csv(report["confusion_matrix"], classes, run_dir / f"confusion_{name}.csv")
    write_confusion_png(report["confusion_matrix"], classes, run_dir / f"confusion_{name}.png", title=name)


def train_fold(
    cfg: ClassificationConfig, run: Run, manifest: Manifest, fold: int | None, resume: bool
) -> dict[str, Any]:
    """Train (or reuse, or resume) one model in ``run.dir``, then evaluate it and write its probability tables."""
    classes = manifest.classes
    column = image_column(cfg)
    rows = split_rows(manifest, cfg, fold)
    fingerprint = training_fingerprint(cfg, cfg.data.manifest, fold)
    finished = None if resume or cfg.run.force else _finished_state(run.dir / "last_state.pt", fingerprint)
    model: LesionClassifier | None = None
    if finished is not None:
        # Size and normalisation from the checkpoint: no model build, so no weights download either.
        meta = read_metadata(run.dir / "best.safetensors")
        size, mean, std = int(meta["input_size"]), tuple(meta["mean"]), tuple(meta["std"])
    else:
        model = build_classifier(
            cfg.model.backbone, len(classes), cfg.model.pretrained, cfg.model.drop_rate, cfg.model.se_reduction
        )
        size = cfg.data.image_size or model.input_size
        if size < model.min_input_size:
            raise ConfigError(
                f"data.image_size {size} is below the {model.min_input_size} px that {model.backbone_name} needs"
            )
        model.input_size = size
        model.data_config["input_size"] = size
        mean, std = model.data_config["mean"], model.data_config["std"]
    cache_root = Path(cfg.run.cache_dir)
    eval_tf = build_transform(cfg.data.augment, size, train=False, mean=mean, std=std)
    pre, force = cfg.data.preprocess, cfg.run.force

    def dataset(subset: Manifest, transform: Any) -> ClassificationDataset:
        return ClassificationDataset(subset, size, cache_root, transform, pre, image_column=column, force=force)

    monitor_ds = dataset(rows.monitor, eval_tf)
    if model is None:
        logger.info("training already finished with these settings in %s; reusing it (--force retrains)", run.dir)
        history = read_metrics(run.dir / "metrics.csv", METRIC_COLUMNS, 10**9)
    else:
        train_tf = build_transform(cfg.data.augment, size, train=True, mean=mean, std=std)
        fit_ds = dataset(rows.fit, train_tf)
        history = _fit(cfg, run, model, rows, fit_ds, monitor_ds, classes, fold, fingerprint, resume)
    return _after_training(cfg, run, rows, monitor_ds, dataset, eval_tf, classes, column, history)


def _finished_state(path: Path, fingerprint: str, warn: bool = True) -> dict[str, Any] | None:
    """The resume state of a finished run with this fingerprint, else ``None`` (saying why when ``warn``)."""
    if not path.is_file() or not (path.parent / "best.safetensors").is_file():
        return None
    try:
        state = load_resume_state(path)
    except CheckpointError:
        return None
    if state.get("finished") and state.get("fingerprint") == fingerprint:
        return state
    if not warn:
        return None
    if state.get("finished"):
        logger.warning("run folder %s holds a run with other settings or data; training afresh", path.parent)
    else:
        logger.warning("run folder %s holds an unfinished run; training afresh (--resume continues it)", path.parent)
    return None


def _fit(
    cfg: ClassificationConfig,
    run: Run,
    model: LesionClassifier,
    rows: SplitRows,
    train_ds: ClassificationDataset,
    monitor_ds: ClassificationDataset,
    classes: Sequence[str],
    fold: int | None,
    fingerprint: str,
    resume: bool,
) -> list[dict[str, Any]]:
    """The epoch loop with freeze-then-unfreeze, early stopping, checkpoints and resume; returns the history."""
    t = cfg.train
    if t.freeze_epochs and not cfg.model.pretrained:
        logger.warning(
            "train.freeze_epochs=%d on a randomly initialised backbone: the head first learns on random "
            "features (set train.freeze_epochs=0 when training from scratch)",
            t.freeze_epochs,
        )
    labels = train_ds.labels
    counts = np.bincount(labels, minlength=len(classes))
    weights = class_weights(counts, cfg.data.balance.class_weights, cfg.data.balance.effective_beta)
    if cfg.data.balance.sampler != "none" and cfg.data.balance.class_weights != "none":
        logger.warning("both a balancing sampler and class weights are on: the rare classes are boosted twice")
    loss_fn = build_loss(cfg, torch.as_tensor(weights, dtype=torch.float32)).to(run.device)
    features = (
        _thumbnails(train_ds) if cfg.data.balance.sampler == "hybrid" and cfg.data.balance.undersample_target else None
    )
    pin = run.device.type == "cuda"
    first = _epoch_batches(train_ds, labels, cfg, 0, features, pin)
    if cfg.data.balance.sampler == "hybrid":
        after = np.bincount(labels[np.asarray(first.sampler.indices)], minlength=len(classes))
        logger.info("hybrid sampling per epoch:\n%s", balance_summary(classes, counts.tolist(), after.tolist()))
    steps = len(first) if not t.max_steps_per_epoch else min(len(first), t.max_steps_per_epoch)
    model.to(run.device)
    if run.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, steps))
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.amp)
    state_path, metrics_path = run.dir / "last_state.pt", run.dir / "metrics.csv"
    start, best, best_loss, best_epoch, stale = 0, -1.0, math.inf, 0, 0
    if resume:
        state = load_resume_state(state_path)
        if state.get("fingerprint") != fingerprint:
            raise CheckpointError(
                f"resume state {state_path} was made with other settings or data: rerun without --resume to "
                "train afresh, or with the settings of that run"
            )
        weights_state, _ = load_checkpoint(run.dir / "last.safetensors", expect={"stage": "classification"})
        load_weights(model, weights_state, run.dir / "last.safetensors")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start, best, best_loss = int(state["epoch"]) + 1, float(state["best"]), float(state["best_loss"])
        best_epoch, stale = int(state["best_epoch"]), int(state["stale"])
        if state.get("finished"):
            start = t.epochs  # it had stopped early or run every epoch: nothing left but the evaluation
        logger.info(
            "resuming at epoch %d of %d (best val balanced accuracy %.4f at epoch %d)",
            start + 1,
            t.epochs,
            best,
            best_epoch,
        )
    history = read_metrics(metrics_path, METRIC_COLUMNS, start)
    meta_extra = {
        "config_hash": run.config_hash,
        "fold": fold,
        "trained_on": rows.trained_on,
        "image_column": image_column(cfg),
        "preprocess": asdict(cfg.data.preprocess),
    }
    eval_loader = DataLoader(
        monitor_ds, batch_size=t.eval_batch_size or 2 * t.batch_size, num_workers=cfg.run.num_workers, pin_memory=pin
    )
    for epoch in range(start, t.epochs):
        frozen = epoch < t.freeze_epochs
        model.set_backbone_trainable(not frozen)
        if epoch == t.freeze_epochs and t.freeze_epochs:
            stale = 0  # patience counts from the unfreeze: the head-only phase plateaus by design
        torch.manual_seed(epoch_seed(cfg.run.seed, epoch))  # dropout draws, reproducible across --resume
        t0 = time.time()
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "phase": "head" if frozen else "all",
            "lr": optimizer.param_groups[0]["lr"],
        }
        batches = first if epoch == 0 else _epoch_batches(train_ds, labels, cfg, epoch, features, pin)
        row.update(
            train_one_epoch(
                model,
                batches,
                loss_fn,
                optimizer,
                scheduler,
                run,
                scaler,
                t.grad_clip,
                t.max_steps_per_epoch,
                desc=f"epoch {epoch + 1}/{t.epochs}",
            )
        )
        result = evaluate(model, eval_loader, run)
        report = classification_report(result["labels"], result["probs"], classes)
        row.update(
            {
                "val_loss": result["loss"],
                "val_balanced_accuracy": report["balanced_accuracy"],
                "val_accuracy": report["accuracy"],
                "val_macro_f1": report["macro_f1"],
                "val_macro_auc": report["macro_auc"] if report["macro_auc"] is not None else float("nan"),
                "sec": round(time.time() - t0, 2),
            }
        )
        history.append(row)
        append_metrics(metrics_path, row, METRIC_COLUMNS)
        meta = checkpoint_metadata(
            model, classes, **meta_extra, epoch=epoch + 1, val_balanced_accuracy=report["balanced_accuracy"]
        )
        save_checkpoint(run.dir / "last.safetensors", model, meta)
        score, loss = report["balanced_accuracy"], result["loss"]
        if score > best or (score == best and loss < best_loss):
            best, best_loss, best_epoch, stale = score, loss, epoch + 1, 0
            save_checkpoint(run.dir / "best.safetensors", model, meta)
        elif not frozen:
            stale += 1
        stopped = bool(t.patience and stale >= t.patience)
        done = stopped or epoch + 1 == t.epochs
        save_resume_state(
            state_path,
            {
                "epoch": epoch,
                "best": best,
                "best_loss": best_loss,
                "best_epoch": best_epoch,
                "stale": stale,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "fingerprint": fingerprint,
                "finished": done,
                "stopped": stopped,
            },
        )
        logger.info(
            "epoch %d/%d (%s): train loss %.4f, val loss %.4f, val %s, %.0f img/s",
            epoch + 1,
            t.epochs,
            row["phase"],
            row["train_loss"],
            row["val_loss"],
            format_report(report),
            row["images_per_sec"],
        )
        if stopped:
            logger.info(
                "early stop: no better val balanced accuracy for %d epochs (best %.4f at epoch %d)",
                stale,
                best,
                best_epoch,
            )
            break
    if start >= t.epochs:
        logger.info("nothing left to resume: the run in %s had finished", run.dir)
    return history


def _after_training(
    cfg: ClassificationConfig,
    run: Run,
    rows: SplitRows,
    monitor_ds: ClassificationDataset,
    dataset: Any,
    eval_tf: Any,
    classes: Sequence[str],
    column: str,
    history: list[dict[str, Any]],
) -> dict[str, Any]:
    """Best checkpoint -> reports, confusion matrices, probability tables (cached), curves and Grad-CAM."""
    best_path = run.dir / "best.safetensors"
    model, meta = load_classifier(best_path, run.device)
    if run.channels_last:
        model.to(memory_format=torch.channels_last)
    digest = weights_digest(best_path)
    settings = {
        **prediction_settings(model, cfg.train.tta, cfg.data.preprocess, column),
        "transform": transform_fingerprint(eval_tf),
    }  # the eval transform's settings are part of the key
    cache = StageCache(cfg.run.cache_dir, "probabilities", force=cfg.run.force)
    batch_size = cfg.train.eval_batch_size or 2 * cfg.train.batch_size
    reports: dict[str, dict[str, Any]] = {}
    tables: dict[str, str] = {}
    for name, subset in rows.tables.items():
        ds = monitor_ds if subset is rows.monitor else dataset(subset, eval_tf)
        probs, path = probability_table(
            model,
            ds,
            run_dir=run.dir,
            cache=cache,
            split=name,
            ids=[r["image_id"] for r in subset.rows],
            crop_keys=row_keys(subset, column),
            labels=[r.get("label", "") for r in subset.rows],
            classes=classes,
            weights_digest=digest,
            settings=settings,
            source=name,
            trained_on=rows.trained_on,
            batch_size=batch_size,
            device=run.device,
            amp=run.amp,
            channels_last=run.channels_last,
            num_workers=cfg.run.num_workers,
        )
        tables[name] = str(path)
        labelled = ds.labels >= 0
        if labelled.any():
            report = classification_report(ds.labels[labelled], probs[labelled], classes)
            reports[name] = report
            _save_report(report, run.dir, name, classes)
            logger.info("%s: %s\n%s", name, format_report(report), per_class_table(report))
    cache.log_summary()
    plot_learning_curves(history, run.dir / "learning_curves.png")
    if cfg.train.gradcam_images and len(rows.monitor):
        chosen = rows.monitor.rows[: cfg.train.gradcam_images]
        save_gradcam_images(
            model,
            [read_image(r[column], max_side=1024) for r in chosen],  # whole images (--no-crop) can be huge
            [r["image_id"] for r in chosen],
            run.dir / "gradcam",
            classes,
            [r.get("label", "") for r in chosen],
            cfg.data.preprocess,
        )
    monitor_name = "oof" if "oof" in rows.tables else "val"
    return {
        "backbone": cfg.model.backbone,
        "run_dir": str(run.dir),
        "best_epoch": int(meta.get("epoch", 0)),
        "epochs_run": len(history),
        "val_balanced_accuracy": reports.get(monitor_name, {}).get("balanced_accuracy"),
        "test_balanced_accuracy": reports.get("test", {}).get("balanced_accuracy"),
        "reports": reports,
        "tables": tables,
        "checkpoint": str(best_path),
    }


def stale_folds(cfg: ClassificationConfig, backbone_dir: Path, k: int) -> list[int]:
    """Folds not yet trained with these settings and data (or whose out-of-fold table is missing or outdated)."""
    stale = []
    for i in range(k):
        fold_dir = backbone_dir / f"fold{i}"
        fingerprint = training_fingerprint(cfg, cfg.data.manifest, i)
        state = _finished_state(fold_dir / "last_state.pt", fingerprint, warn=False)
        table = fold_dir / "probs_oof.json"
        current = state is not None and table.is_file()
        if not current or json.loads(table.read_text()).get("weights_digest") != weights_digest(
            fold_dir / "best.safetensors"
        ):
            stale.append(i)
    return stale


def combine_folds(cfg: ClassificationConfig, backbone_dir: Path, k: int) -> dict[str, Any] | None:
    """Once every fold is done: one OOF table over the whole training split, and val/test tables averaged over the
    K fold models, in ``backbone_dir``. Returns ``None`` while a fold is missing."""
    fold_dirs = [backbone_dir / f"fold{i}" for i in range(k)]
    if stale_folds(cfg, backbone_dir, k):
        return None
    cache = StageCache(cfg.run.cache_dir, "probabilities", force=cfg.run.force)
    result: dict[str, Any] = {"tables": {}, "reports": {}}
    oof = [read_probability_table(d, "oof") for d in fold_dirs]
    if any(t[4]["settings"] != oof[0][4]["settings"] for t in oof):
        logger.warning(
            "the folds of %s were predicted with different settings (e.g. TTA); rerun them alike to "
            "combine their tables",
            backbone_dir,
        )
        return None
    classes = oof[0][4]["classes"]
    digests = [t[4]["weights_digest"] for t in oof]
    for name in ("oof", "val", "test"):
        if name == "oof":
            parts = oof
            ids = [i for p in parts for i in p[0]]
            keys = [c for p in parts for c in p[1]]
            labels = [lab for p in parts for lab in p[2]]
            probs = np.concatenate([p[3] for p in parts])
            trained_on = f"train ({k} folds; each row predicted by the model that did not see its fold)"
        else:
            if not all((d / f"probs_{name}.csv").is_file() for d in fold_dirs):
                continue
            parts = [read_probability_table(d, name) for d in fold_dirs]
            ids, keys, labels = parts[0][0], parts[0][1], parts[0][2]
            if any(p[1] != keys for p in parts):
                raise ManifestError(f"the folds of {backbone_dir} predicted different {name} rows: rerun with --force")
            probs = np.mean([p[3] for p in parts], axis=0)
            trained_on = f"train (mean of the {k} fold models)"
        meta = {
            "backbone": cfg.model.backbone,
            "source": name,
            "trained_on": trained_on,
            "weights_digest": combined_digest(digests),
            "settings": {**parts[0][4]["settings"], "folds": k},
            "fold_tables": [p[4]["table_key"] for p in parts],
        }
        result["tables"][name] = str(
            write_probability_table(backbone_dir, cache, name, ids, keys, labels, probs, classes, meta)
        )
        index = {c: i for i, c in enumerate(classes)}
        y = np.array([index.get(lab, -1) for lab in labels])
        if (y >= 0).any():
            report = classification_report(y[y >= 0], probs[y >= 0], classes)
            result["reports"][name] = report
            _save_report(report, backbone_dir, name, classes)
            logger.info("%d folds, %s: %s", k, name, format_report(report))
    return result


def run_classification(cfg: ClassificationConfig, resume: bool = False) -> dict[str, Any]:
    """Train one backbone (or its K folds) into ``<run.out_dir>/<backbone>[/fold<i>]``; returns the summary."""
    resolve_backbone(cfg.model.backbone)  # an unknown name fails before any run folder is made
    manifest = read_training_manifest(cfg)
    backbone_dir = Path(cfg.run.out_dir) / cfg.model.backbone
    r = cfg.run

    def start(path: Path) -> Run:
        return start_run(path, cfg, r.seed, r.device, r.amp, r.channels_last, r.threads)

    if not cfg.train.folds:
        return train_fold(cfg, start(backbone_dir), manifest, None, resume)
    k = cfg.train.folds
    backbone_dir.mkdir(parents=True, exist_ok=True)
    manifest.write(backbone_dir / "folds.csv")
    chosen = [cfg.train.fold] if cfg.train.fold >= 0 else list(range(k))
    folds = [train_fold(cfg, start(backbone_dir / f"fold{i}"), manifest, i, resume) for i in chosen]
    combined = combine_folds(cfg, backbone_dir, k)
    summary = dict(folds[-1])
    summary.update({"folds": folds, "run_dir": str(backbone_dir) if combined else folds[-1]["run_dir"]})
    if combined is not None:
        summary["tables"] = combined["tables"]
        summary["val_balanced_accuracy"] = combined["reports"].get("oof", {}).get("balanced_accuracy")
        summary["test_balanced_accuracy"] = combined["reports"].get("test", {}).get("balanced_accuracy")
        summary["combined"] = True
    else:
        logger.info(
            "folds %s still to train before the out-of-fold table is complete", stale_folds(cfg, backbone_dir, k)
        )
        summary["combined"] = False
    return summary
