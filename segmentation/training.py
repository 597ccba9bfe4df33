"""U-Net training: Dice + BCE, AdamW with one-cycle or cosine schedule, early stopping on validation Jaccard."""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader
from tqdm import tqdm

from dermpipe.data.augment import build_transform
from dermpipe.data.datasets import SegmentationDataset, seed_epoch, seed_worker
from dermpipe.data.manifest import Manifest, ManifestError
from dermpipe.engine.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_resume_state,
    load_weights,
    save_resume_state,
)
from dermpipe.engine.run import Run, append_metrics, optimiser_step, read_metrics
from dermpipe.segmentation.config import SegmentationConfig
from dermpipe.segmentation.inference import validation_panel
from dermpipe.segmentation.metrics import batch_scores_torch
from dermpipe.segmentation.model import IMAGENET_MEAN, IMAGENET_STD, build_unet, load_unet, save_unet

logger = logging.getLogger(__name__)

METRIC_COLUMNS = ("epoch", "lr", "train_loss", "val_loss", "val_dice", "val_jaccard", "val_thresholded_jaccard", "sec")


class DiceBCELoss(torch.nn.Module):
    """Soft Dice plus binary cross-entropy on the logits, optionally plus a per-image Lovasz hinge.

    Dice over the whole batch (smp's binary mode) lets a large lesion outweigh a missed small one; ``per_image``
    averages one soft Dice per image instead, as the ISIC score averages one Jaccard per image. ``lovasz_weight``
    adds smp's Lovasz hinge computed per image, a convex surrogate of the Jaccard index itself.
    """

    def __init__(
        self, dice_weight: float = 1.0, bce_weight: float = 1.0, per_image: bool = False, lovasz_weight: float = 0.0
    ) -> None:
        super().__init__()
        self.dice = smp.losses.DiceLoss(mode="binary", from_logits=True)
        self.bce = torch.nn.BCEWithLogitsLoss()
        self.lovasz = smp.losses.LovaszLoss(mode="binary", per_image=True, from_logits=True)
        self.dice_weight, self.bce_weight, self.per_image = dice_weight, bce_weight, per_image
        self.lovasz_weight = lovasz_weight

    def dice_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not self.per_image:
            return self.dice(logits, target)
        prob = torch.sigmoid(logits.float()).flatten(1)
        target = target.float().flatten(1)
        overlap = (prob * target).sum(1)
        total = prob.sum(1) + target.sum(1)
        return (1.0 - (2.0 * overlap + 1.0) / (total + 1.0)).mean()  # +1: an empty mask predicted empty scores 1

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.dice_weight * self.dice_loss(logits, target) + self.bce_weight * self.bce(logits, target)
        if self.lovasz_weight:
            loss = loss + self.lovasz_weight * self.lovasz(logits.float(), target)
        return loss


def train_one_epoch(
    model: torch.nn.Module,
    loader: DataLoader,
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    run: Run,
    scaler: torch.amp.GradScaler,
    grad_clip: float = 0.0,
    max_steps: int = 0,
    desc: str = "train",
    ema: ModelEmaV3 | None = None,
) -> dict[str, float]:
    model.train()
    total = torch.zeros((), device=run.device)  # summed on the device: no GPU stall per step
    count = 0
    for step, (images, masks) in enumerate(tqdm(loader, desc=desc, leave=False, disable=None)):
        if max_steps and step >= max_steps:
            break
        images, masks = run.batch(images, masks)
        with run.autocast():
            loss = loss_fn(model(images), masks)
        optimiser_step(loss, model, optimizer, scaler, grad_clip)
        scheduler.step()
        if ema is not None:
            ema.update(model, step=scheduler.last_epoch)  # the scheduler counts optimiser steps, resume included
        total += loss.detach().float() * len(images)
        count += len(images)
    return {"train_loss": float(total) / max(count, 1)}


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader: DataLoader, loss_fn: torch.nn.Module, run: Run) -> dict[str, float]:
    """Loss and per-image Dice / Jaccard / thresholded Jaccard at the training resolution, averaged over images."""
    model.eval()
    total, count = 0.0, 0
    scores: dict[str, list[torch.Tensor]] = {"dice": [], "jaccard": [], "thresholded_jaccard": []}
    for images, masks in loader:
        images, masks = run.batch(images, masks)
        with run.autocast():
            logits = model(images)
        total += loss_fn(logits.float(), masks).item() * len(images)
        count += len(images)
        for k, v in batch_scores_torch(logits.float(), masks).items():
            if k in scores:
                scores[k].append(v.cpu())
    out = {"val_loss": total / max(count, 1)}
    out.update({f"val_{k}": float(torch.cat(v).mean()) for k, v in scores.items() if v})
    return out


def make_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, lr: float, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if kind == "onecycle":
        pct = min(max(warmup_steps / max(total_steps, 1), 0.05), 0.5)
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(total_steps, 1), pct_start=pct)
    if kind == "cosine":

        def factor(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    raise ValueError(f"train.schedule {kind!r}: use onecycle or cosine")


def _loaders(cfg: SegmentationConfig, manifest: Manifest, run: Run) -> tuple[DataLoader, DataLoader, Manifest]:
    size = cfg.data.image_size
    rows = replace(manifest, rows=tuple(r for r in manifest.rows if r.get("mask_path")))
    if len(rows) < len(manifest):
        logger.info("segmentation uses the %d of %d images that have a mask", len(rows), len(manifest))
    train, val = rows.select("train"), rows.select("val")
    if len(train) == 0 or len(val) == 0:
        raise ManifestError(
            f"manifest {cfg.data.manifest} has {len(train)} train and {len(val)} val images with masks; "
            "both are needed (split it with `python data/convert.py`)"
        )
    cache = Path(cfg.run.cache_dir)
    train_tf = build_transform(cfg.data.augment, size, train=True, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    eval_tf = build_transform(cfg.data.augment, size, train=False, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    train_ds = SegmentationDataset(train, size, cache, train_tf, cfg.data.preprocess, force=cfg.run.force)
    val_ds = SegmentationDataset(val, size, cache, eval_tf, cfg.data.preprocess, force=cfg.run.force)
    generator = torch.Generator().manual_seed(cfg.run.seed)
    pin = run.device.type == "cuda"
    train_loader = DataLoader(
        train_ds,
        batch_size=cfg.train.batch_size,
        shuffle=True,
        drop_last=len(train_ds) > cfg.train.batch_size,
        num_workers=cfg.run.num_workers,
        generator=generator,
        worker_init_fn=seed_worker,
        pin_memory=pin,
        persistent_workers=cfg.run.num_workers > 0,
    )
    val_loader = DataLoader(val_ds, batch_size=cfg.train.batch_size, num_workers=cfg.run.num_workers, pin_memory=pin)
    return train_loader, val_loader, val


def train_segmentation(cfg: SegmentationConfig, run: Run, resume: bool = False) -> dict[str, Any]:
    """Train the U-Net; write best/last checkpoints, metrics.csv, curves and a validation panel into the run."""
    manifest = Manifest.read(cfg.data.manifest)
    train_loader, val_loader, val_manifest = _loaders(cfg, manifest, run)
    model = build_unet(cfg.model).to(run.device)
    if run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = DiceBCELoss(
        cfg.train.dice_weight, cfg.train.bce_weight, cfg.train.dice_per_image, cfg.train.lovasz_weight
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    steps_per_epoch = len(train_loader)
    if cfg.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_steps_per_epoch)
    scheduler = make_scheduler(
        optimizer,
        cfg.train.schedule,
        cfg.train.lr,
        steps_per_epoch * cfg.train.epochs,
        int(cfg.train.warmup_epochs * steps_per_epoch),
    )
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.amp)
    # with EMA, validation, best.safetensors and prediction use the averaged weights; last.safetensors keeps the
    # trained ones (what --resume continues from), the average travels in last_state.pt
    ema = ModelEmaV3(model, decay=cfg.train.ema_decay, use_warmup=True) if cfg.train.ema_decay > 0 else None
    scored = ema.module if ema is not None else model
    start, best, stale = 0, -1.0, 0
    state_path, metrics_path = run.dir / "last_state.pt", run.dir / "metrics.csv"
    if resume:
        state = load_resume_state(state_path)
        weights, _ = load_checkpoint(run.dir / "last.safetensors", expect={"stage": "segmentation"})
        load_weights(model, weights, run.dir / "last.safetensors")
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        if ema is not None:
            if "ema" not in state:
                raise CheckpointError(f"{state_path} has no weight average: resume with train.ema_decay=0 or anew")
            ema.module.load_state_dict(state["ema"])
        start, best, stale = int(state["epoch"]) + 1, float(state["best"]), int(state["stale"])
        # rebuild the schedule for the (possibly extended) epoch count and replay it up to where training stopped
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(start * steps_per_epoch):
                scheduler.step()
        logger.info("resuming at epoch %d (best val Jaccard %.4f)", start + 1, best)
    elif metrics_path.exists():
        metrics_path.unlink()
    history = [{k: float(v) for k, v in r.items()} for r in read_metrics(metrics_path, METRIC_COLUMNS, start)]
    for epoch in range(start, cfg.train.epochs):
        seed_epoch(train_loader, cfg.run.seed, epoch)
        t0 = time.time()
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
        row.update(
            train_one_epoch(
                model,
                train_loader,
                loss_fn,
                optimizer,
                scheduler,
                run,
                scaler,
                cfg.train.grad_clip,
                cfg.train.max_steps_per_epoch,
                desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                ema=ema,
            )
        )
        row.update(evaluate(scored, val_loader, loss_fn, run))
        row["sec"] = round(time.time() - t0, 2)
        history.append(row)
        append_metrics(metrics_path, row, METRIC_COLUMNS)
        extra = {"epoch": epoch + 1, "val_jaccard": row["val_jaccard"]}
        save_unet(run.dir / "last.safetensors", model, cfg.model, cfg.data.image_size, run.config_hash, extra)
        if row["val_jaccard"] > best:
            best, stale = row["val_jaccard"], 0
            save_unet(run.dir / "best.safetensors", scored, cfg.model, cfg.data.image_size, run.config_hash, extra)
        else:
            stale += 1
        save_resume_state(
            state_path,
            {
                "epoch": epoch,
                "best": best,
                "stale": stale,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                **({"ema": ema.module.state_dict()} if ema is not None else {}),
            },
        )
        logger.info(
            "epoch %d: train loss %.4f, val loss %.4f, val Jaccard %.4f (thresholded %.4f), %.1fs",
            epoch + 1,
            row["train_loss"],
            row["val_loss"],
            row["val_jaccard"],
            row["val_thresholded_jaccard"],
            row["sec"],
        )
        if cfg.train.patience and stale >= cfg.train.patience:
            logger.info("early stop: no better val Jaccard for %d epochs", stale)
            break
    plot_curves(history, run.dir / "curves.png")
    if cfg.train.panel_images:
        validation_panel(
            load_unet(run.dir / "best.safetensors", run.device),
            val_manifest,
            cfg,
            run.dir / "val_panel.png",
            run.device,
        )
    best_row = max(history, key=lambda r: float(r["val_jaccard"])) if history else {}
    return {
        "best_val_jaccard": best,
        "best_epoch": best_row.get("epoch"),
        "epochs_run": len(history),
        "checkpoint": str(run.dir / "best.safetensors"),
    }


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss and Jaccard curves per epoch as a PNG."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(epochs, [r["train_loss"] for r in history], label="train loss")
    a.plot(epochs, [r["val_loss"] for r in history], label="val loss")
    a.set_xlabel("epoch")
    a.legend()
    for key in ("val_dice", "val_jaccard", "val_thresholded_jaccard"):
        b.plot(epochs, [r[key] for r in history], label=key.removeprefix("val_"))
    b.set_xlabel("epoch")
    b.set_ylim(0, 1)
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
