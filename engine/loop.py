"""The one training loop both stages call: epochs, AMP, gradient clipping, per-step schedule, weight averaging,
early stopping, best/last checkpoints, ``metrics.csv``, progress, and a resume that refuses other settings.

A stage supplies what is its own (model, loss, batches, validation metrics, checkpoint writer) as a ``Stage``;
everything about the epochs is here, once.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from timm.utils import ModelEmaV3
from tqdm import tqdm

from dermpipe.engine.checkpoint import (
    save_resume_state,
)
from dermpipe.engine.distributed import (
    barrier,
    broadcast,
    is_main,
    rank,
    rank_loader,
    sum_over_ranks,
    world_size,
)
from dermpipe.engine.files import atomic_path, file_digest
from dermpipe.engine.resume import _Progress, _resumed, _state
from dermpipe.engine.run import Run

logger = logging.getLogger(__name__)

STATE_FILE = "last_state.pt"
METRICS_FILE = "metrics.csv"


class Scorer(Protocol):
    """Accumulates a stage's metrics over batches: ``update(logits, targets)`` per batch, then ``compute()``."""

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None: ...

    def compute(self) -> dict[str, Any]: ...


class Stage(Protocol):
    """What a stage gives the loop."""

    def start_epoch(self, epoch: int) -> dict[str, Any]:
        """Set up epoch ``epoch`` (0-based), e.g. freeze or unfreeze; returns extra ``metrics.csv`` fields."""
        ...

    def batches(self, epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """This epoch's training batches, every random draw seeded from (seed, epoch)."""
        ...

    def train_scorer(self) -> Scorer | None:
        """Training metrics besides the loss (``None``: the loss only)."""
        ...

    def validate(self, model: torch.nn.Module) -> dict[str, Any]:
        """Validation metrics of ``model`` (the ``val_*`` columns, including the monitored one)."""
        ...

    def save(self, path: Path, model: torch.nn.Module, row: Mapping[str, Any]) -> None:
        """Write ``model`` as a checkpoint at ``path`` (``row`` is this epoch's metrics)."""
        ...


@dataclass(frozen=True)
class LoopSettings:
    """How the loop runs; ``fingerprint`` stands for every setting and input that decides the trained weights."""

    epochs: int
    columns: Sequence[str]
    monitor: str  # the validation metric to maximise, e.g. val_jaccard
    fingerprint: str
    stage: str  # the checkpoint's stage, checked when resuming
    seed: int = 0
    patience: int = 0  # epochs without a better monitored score before stopping; 0 = never
    patience_from: int = 0  # epochs before this never count as stale (a head-only phase plateaus by design)
    tie_break: str | None = None  # equal scores: the lower value of this column wins (e.g. val_loss)
    grad_clip: float = 0.0
    max_steps_per_epoch: int = 0
    ema_decay: float = 0.0  # > 0: validate and keep as best a moving average of the weights (timm's ModelEmaV3)
    settings: Mapping[str, Any] | None = field(default=None, compare=False)  # what the fingerprint stands for, kept
    note: str = ""  # logged once the run folder's log is open (e.g. that --force replaces a finished run)

    @classmethod
    def from_train(cls, train: Any, seed: int, **fields: Any) -> LoopSettings:
        """Settings from a stage config's ``train`` section (its epochs, patience, grad_clip, max_steps_per_epoch)."""
        common = {k: getattr(train, k) for k in ("epochs", "patience", "grad_clip", "max_steps_per_epoch")}
        return cls(**common, seed=seed, **fields)

    def steps_per_epoch(self, batches: int) -> int:
        """Optimiser steps in an epoch of ``batches`` batches (``max_steps_per_epoch`` caps it)."""
        return min(batches, self.max_steps_per_epoch) if self.max_steps_per_epoch else batches


@dataclass
class FitResult:
    history: list[dict[str, Any]]
    best: float
    best_epoch: int
    stopped: bool
    reused: bool = False  # training had already finished with these settings: nothing was trained
    extra: dict[str, Any] = field(default_factory=dict)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's random draws: each epoch its own, so a resumed run repeats an uninterrupted one."""
    return seed * 100_003 + epoch


def fingerprint(payload: Mapping[str, Any], manifest: str | None = None) -> str:
    """A short hash of what decides the trained weights: settings (a plain mapping) and the manifest's bytes."""
    blob = {**payload, "manifest": file_digest(manifest) if manifest else None}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def append_metrics(path: Path, row: Mapping[str, Any], columns: Sequence[str]) -> None:
    """Append one epoch's row to a run's ``metrics.csv`` (header on the first row; floats to 6 significant digits)."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def read_metrics(path: Path, columns: Sequence[str], up_to_epoch: int) -> list[dict[str, str]]:
    """The rows of ``metrics.csv`` for epochs up to ``up_to_epoch``; later rows belong to an epoch that was cut off
    after its row was written but before its state was saved: the file is rewritten without them."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    kept = [r for r in rows if int(float(r["epoch"])) <= up_to_epoch]
    if len(kept) < len(rows) and not kept:
        path.unlink()
    elif len(kept) < len(rows):  # rewrite beside it, then swap: an interruption here never loses the kept rows
        with atomic_path(path) as tmp:
            for r in kept:
                append_metrics(tmp, r, columns)
    return kept


def optimiser_step(
    loss: torch.Tensor,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    grad_clip: float = 0.0,
) -> None:
    """One optimiser step through the AMP scaler, with the gradient norm clipped first when ``grad_clip`` > 0."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()


def train_one_epoch(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    run: Run,
    scaler: torch.amp.GradScaler,
    grad_clip: float = 0.0,
    max_steps: int = 0,
    desc: str = "train",
    ema: ModelEmaV3 | None = None,
    scorer: Scorer | None = None,
) -> dict[str, Any]:
    """One pass over ``batches``: the mean loss, images per second, and the scorer's training metrics."""
    model.train()
    loss_sum = torch.zeros((), device=run.device)  # summed on the device: a .item() per step would stall a GPU
    seen = 0
    start = time.perf_counter()
    for step, (images, targets) in enumerate(tqdm(batches, desc=desc, leave=False, disable=None)):
        if max_steps and step >= max_steps:
            break
        images, targets = run.batch(images, targets)
        with run.autocast():
            logits = model(images)
        loss = loss_fn(logits.float(), targets)
        optimiser_step(loss, model, optimizer, scaler, grad_clip)
        if scheduler is not None:
            scheduler.step()
        if ema is not None:  # the scheduler counts optimiser steps, resume included
            ema.update(model, step=scheduler.last_epoch if scheduler is not None else None)
        if scorer is not None:
            scorer.update(logits.detach(), targets)
        loss_sum += loss.detach().float() * len(images)
        seen += len(images)
    elapsed = time.perf_counter() - start
    total_loss, total_seen = sum_over_ranks(float(loss_sum), seen)  # every rank's share of the global batches
    out: dict[str, Any] = {
        "train_loss": total_loss / total_seen if total_seen else float("nan"),
        "images_per_sec": total_seen / max(elapsed, 1e-9),
    }
    if scorer is not None and seen:
        out.update(scorer.compute())
    return out


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], run: Run, scorer: Scorer
) -> dict[str, Any]:
    """Run ``model`` over ``loader`` in eval mode and return the scorer's metrics (float logits, device targets)."""
    model.eval()
    for images, targets in loader:
        images, targets = run.batch(images, targets)
        with run.autocast():
            logits = model(images)
        scorer.update(logits.float(), targets)
    return scorer.compute()


def fit(
    stage: Stage,
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    run: Run,
    settings: LoopSettings,
    resume: bool = False,
) -> FitResult:
    """Train ``model`` for ``settings.epochs`` into ``run.dir``; with ``resume``, continue from ``last_state.pt``.

    Writes ``last.safetensors`` (the trained weights, what a resume continues from) and ``best.safetensors`` (the
    scored weights: the moving average when ``ema_decay`` > 0) through ``stage.save``, one ``metrics.csv`` row and
    the resume state per epoch. A resume with other settings or data is refused, never silently mixed.
    """
    s = settings
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.scaled)
    ema = ModelEmaV3(model, decay=s.ema_decay, use_warmup=True) if s.ema_decay > 0 else None
    scored = ema.module if ema is not None else model
    state_path, metrics_path = run.dir / STATE_FILE, run.dir / METRICS_FILE
    progress = _resumed(state_path, s, run, model, optimizer, scheduler, scaler, ema) if resume else _Progress()
    run.begin()  # everything validated: from here on the run folder is written (by rank 0 alone under torchrun)
    if s.note:
        logger.warning("%s", s.note)
    main = is_main()
    if main and not resume and metrics_path.exists():
        metrics_path.unlink()
    history: list[dict[str, Any]] = read_metrics(metrics_path, s.columns, progress.start) if main else []
    stopped = False
    trainer = Trainer(model, run)
    for epoch in range(progress.start, s.epochs):
        if epoch == s.patience_from and s.patience_from:
            progress.stale = 0  # patience counts from the end of the warm phase
        row: dict[str, Any] = {"epoch": epoch + 1, **stage.start_epoch(epoch), "lr": optimizer.param_groups[0]["lr"]}
        torch.manual_seed(epoch_seed(s.seed, epoch) + rank())  # dropout draws, reproducible across --resume
        t0 = time.time()
        row.update(
            train_one_epoch(
                trainer.model(),  # DDP and torch.compile when on, rebuilt when a phase changes what trains
                rank_loader(stage.batches(epoch)),
                loss_fn,
                optimizer,
                scheduler,
                run,
                scaler,
                s.grad_clip,
                s.max_steps_per_epoch,
                desc=f"epoch {epoch + 1}/{s.epochs}",
                ema=ema,
                scorer=stage.train_scorer(),
            )
        )
        row.update(broadcast(stage.validate(scored) if main else None))  # scored once, on rank 0: one decision
        row["sec"] = round(time.time() - t0, 2)
        history.append(row)
        if main:
            append_metrics(metrics_path, row, s.columns)
            stage.save(run.dir / "last.safetensors", model, row)
        score = float(row[s.monitor])
        tie = float(row[s.tie_break]) if s.tie_break else 0.0
        if progress.improves(score, tie, s.tie_break):
            progress.best, progress.best_tie, progress.best_epoch, progress.stale = score, tie, epoch + 1, 0
            if main:
                stage.save(run.dir / "best.safetensors", scored, row)
        elif epoch >= s.patience_from:
            progress.stale += 1
        stopped = bool(s.patience and progress.stale >= s.patience)
        if main:
            state = _state(epoch, progress, s, model, optimizer, scheduler, scaler, ema, epoch + 1 == s.epochs, stopped)
            save_resume_state(state_path, state)
        logger.info("epoch %d/%d: %s", epoch + 1, s.epochs, describe(row))
        if stopped:
            logger.info("early stop: no better %s for %d epochs (best %.4f at epoch %d)", s.monitor, progress.stale,
                        progress.best, progress.best_epoch)  # fmt: skip
            break
    if progress.start >= s.epochs:
        logger.info("nothing left to resume: the run in %s had finished", run.dir)
    barrier()  # every rank leaves once rank 0 has written the last epoch's files
    return FitResult(history, progress.best, progress.best_epoch, stopped)


class Trainer:
    """The module the training steps run: ``model`` itself, under DistributedDataParallel when several processes
    train it (gradients averaged over ranks), and compiled when ``run.compile``. It shares the model's parameters: the
    bare model is what is validated and saved. DDP registers only the parameters that train when it is built, so it
    is built again when a phase freezes or unfreezes some (and compiled again with it)."""

    def __init__(self, model: torch.nn.Module, run: Run) -> None:
        self.bare, self.run = model, run
        self.trains: tuple[bool, ...] | None = None
        self.wrapped: torch.nn.Module = model

    def model(self) -> torch.nn.Module:
        trains = tuple(p.requires_grad for p in self.bare.parameters())
        if trains != self.trains:
            self.trains, self.wrapped = trains, self.bare
            if world_size() > 1:
                from torch.nn.parallel import DistributedDataParallel

                dev = self.run.device
                ids = [dev.index] if dev.type == "cuda" else None
                self.wrapped = DistributedDataParallel(self.bare, device_ids=ids)
            if self.run.compile:
                self.wrapped = torch.compile(self.wrapped)
        return self.wrapped


def describe(row: Mapping[str, Any]) -> str:
    """One epoch's row as a log line: the losses and scores to four places, throughput, seconds."""
    parts = []
    for key, value in row.items():
        if key in ("epoch", "lr"):
            continue
        if key == "images_per_sec":
            parts.append(f"{value:.0f} img/s")
        elif key == "sec":
            parts.append(f"{value:.1f}s")
        elif isinstance(value, float):
            parts.append(f"{key} {value:.4f}")
        else:
            parts.append(f"{key} {value}")
    return ", ".join(parts)
