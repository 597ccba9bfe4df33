"""U-Net training on lesion masks through the engine's one loop: Dice + BCE, early stopping on validation Jaccard."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from dermpipe.configs.loader import to_dict
from dermpipe.data.augment import build_transform
from dermpipe.data.loaders import SegmentationDataset, end_with_parent, seed_epoch, seed_worker
from dermpipe.data.manifest import Manifest, ManifestError
from dermpipe.engine.claim import claim_run, training_conflict
from dermpipe.engine.distributed import is_main, rank
from dermpipe.engine.files import atomic_path
from dermpipe.engine.lineage import file_sha256, write_lineage
from dermpipe.engine.loop import LoopSettings, evaluate, fingerprint, fit, read_metrics
from dermpipe.engine.rerun import MANIFEST_DIGEST, Conflict, recorded_settings
from dermpipe.engine.run import Run
from dermpipe.engine.schedules import Schedule
from dermpipe.segmentation.config import SegmentationConfig
from dermpipe.segmentation.losses import DiceBCELoss
from dermpipe.segmentation.metrics import batch_scores_torch
from dermpipe.segmentation.model import STAGE, build_unet, encoder_normalisation, load_unet, save_unet
from dermpipe.segmentation.panel import validation_panel

logger = logging.getLogger(__name__)

METRIC_COLUMNS = ("epoch", "lr", "train_loss", "val_loss", "val_dice", "val_jaccard", "val_thresholded_jaccard", "sec")
# Settings that change what is drawn after training, not the trained weights.
_AFTER_TRAINING = ("panel_images",)


class MaskScorer:
    """Validation loss and per-image Dice / Jaccard / thresholded Jaccard at the training size, averaged over images."""

    def __init__(self, loss_fn: torch.nn.Module) -> None:
        self.loss_fn = loss_fn
        self.loss_sum, self.count = 0.0, 0
        self.scores: dict[str, list[torch.Tensor]] = {"dice": [], "jaccard": [], "thresholded_jaccard": []}

    def update(self, logits: torch.Tensor, masks: torch.Tensor) -> None:
        self.loss_sum += self.loss_fn(logits, masks).item() * len(logits)
        self.count += len(logits)
        for k, v in batch_scores_torch(logits, masks).items():
            if k in self.scores:
                self.scores[k].append(v.cpu())

    def compute(self) -> dict[str, float]:
        out = {"val_loss": self.loss_sum / max(self.count, 1)}
        out.update({f"val_{k}": float(torch.cat(v).mean()) for k, v in self.scores.items() if v})
        return out


class SegmentationStage:
    """What the engine's loop needs from the segmentation stage."""

    def __init__(
        self, cfg: SegmentationConfig, run: Run, train: DataLoader, val: DataLoader, loss_fn: torch.nn.Module
    ) -> None:
        self.cfg, self.run, self.train, self.val, self.loss_fn = cfg, run, train, val, loss_fn

    def start_epoch(self, epoch: int) -> dict[str, Any]:
        return {}

    def batches(self, epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        seed_epoch(self.train, self.cfg.run.seed, epoch)
        return self.train

    def train_scorer(self) -> None:
        return None

    def validate(self, model: torch.nn.Module) -> dict[str, Any]:
        return evaluate(model, self.val, self.run, MaskScorer(self.loss_fn))

    def save(self, path: Path, model: torch.nn.Module, row: Mapping[str, Any]) -> None:
        extra = {
            "epoch": row["epoch"],
            "val_jaccard": row["val_jaccard"],
            "preprocess": asdict(self.cfg.data.preprocess),
        }
        save_unet(path, model, self.cfg.model, self.cfg.data.image_size, self.run.config_hash, extra)


def _training_payload(cfg: SegmentationConfig) -> dict[str, Any]:
    train = {k: v for k, v in asdict(cfg.train).items() if k not in _AFTER_TRAINING}
    return {"data": to_dict(cfg.data), "model": to_dict(cfg.model), "train": train, "seed": cfg.run.seed}


def training_fingerprint(cfg: SegmentationConfig) -> str:
    """What decides the trained weights: data, model and training settings, the seed and the manifest's bytes."""
    return fingerprint(_training_payload(cfg), cfg.data.manifest)


def training_settings(cfg: SegmentationConfig) -> dict[str, Any]:
    """The settings the fingerprint stands for, as dotted keys with the manifest's digest: what a run records."""
    return recorded_settings(_training_payload(cfg), cfg.data.manifest)


def training_conflicts(cfg: SegmentationConfig, run_dir: Path) -> list[Conflict]:
    """The U-Net run in ``run_dir`` when it was made with other settings or data than ``cfg`` (none: empty)."""
    found = training_conflict(run_dir, training_fingerprint(cfg), training_settings(cfg), "U-Net")
    return [found] if found is not None else []


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
    mean, std = encoder_normalisation(cfg.model)  # what the encoder's pretrained config asks for
    train_tf = build_transform(cfg.data.augment, size, train=True, mean=mean, std=std)
    eval_tf = build_transform(cfg.data.augment, size, train=False, mean=mean, std=std)
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
    val_loader = DataLoader(
        val_ds, batch_size=cfg.train.batch_size, num_workers=cfg.run.num_workers, pin_memory=pin,
        worker_init_fn=end_with_parent,
    )  # fmt: skip
    return train_loader, val_loader, val


def train_segmentation(cfg: SegmentationConfig, run: Run, resume: bool = False) -> dict[str, Any]:
    """Train the U-Net (or reuse a finished run with these settings); write best/last checkpoints, metrics.csv,
    curves and a validation panel into the run."""
    t = cfg.train
    manifest = Manifest.read(cfg.data.manifest)
    key, recorded = training_fingerprint(cfg), training_settings(cfg)
    done, note = claim_run(run.dir, key, recorded, "U-Net", cfg.run.force, resume)  # refused before anything is written
    train_loader, val_loader, val_manifest = _loaders(cfg, manifest, run)
    if done is not None:
        logger.info("training already finished with these settings in %s; reusing it (--force retrains)", run.dir)
        history = read_metrics(run.dir / "metrics.csv", METRIC_COLUMNS, 10**9)
        best, best_epoch = float(done["best"]), int(done["best_epoch"])
    else:
        model = build_unet(cfg.model).to(run.device)
        if run.channels_last:
            model = model.to(memory_format=torch.channels_last)
        loss_fn = DiceBCELoss(t.dice_weight, t.bce_weight, t.dice_per_image, t.lovasz_weight)
        optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        settings = LoopSettings.from_train(
            t, cfg.run.seed, columns=METRIC_COLUMNS, monitor="val_jaccard", ema_decay=t.ema_decay, fingerprint=key,
            stage=STAGE, settings=recorded, note=note,
        )  # fmt: skip
        steps = settings.steps_per_epoch(len(train_loader))
        schedule = Schedule(t.schedule, steps * t.epochs, int(t.warmup_epochs * steps))
        stage = SegmentationStage(cfg, run, train_loader, val_loader, loss_fn)
        result = fit(stage, model, loss_fn, optimizer, schedule.scheduler(optimizer), run, settings, resume)
        history, best, best_epoch = result.history, result.best, result.best_epoch
    if not is_main():  # under torchrun rank 0 alone draws and writes
        return {"best_val_jaccard": best, "best_epoch": best_epoch, "rank": rank()}
    best_path = run.dir / "best.safetensors"
    consumed = {"manifest": recorded[MANIFEST_DIGEST]}
    write_lineage(run.dir, "segmentation", consumed, {"weights": file_sha256(best_path)})
    plot_curves(history, run.dir / "curves.png")
    if t.panel_images:
        loaded = load_unet(run.dir / "best.safetensors", run.device)
        validation_panel(loaded, val_manifest, cfg, run.dir / "val_panel.png", run.device)
    return {
        "best_val_jaccard": best,
        "best_epoch": best_epoch,
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

    history = [{k: float(v) for k, v in r.items() if k != "phase"} for r in history]  # rows read back are text
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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
