"""The resume state of a training: where it stood after each epoch (written to last_state.pt), loaded back on
--resume."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from timm.utils import ModelEmaV3

from dermpipe.engine.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_resume_state,
    load_weights,
)
from dermpipe.engine.rerun import differences
from dermpipe.engine.run import Run

if TYPE_CHECKING:
    from dermpipe.engine.loop import LoopSettings

logger = logging.getLogger(__name__)


@dataclass
class _Progress:
    """Where a training stands after an epoch: the next epoch, the best monitored score and when, the epochs since."""

    start: int = 0
    best: float = -math.inf
    best_tie: float = math.inf
    best_epoch: int = 0
    stale: int = 0

    def improves(self, score: float, tie: float, tie_break: str | None) -> bool:
        return score > self.best or bool(tie_break and score == self.best and tie < self.best_tie)


def _resumed(
    state_path: Path,
    s: LoopSettings,
    run: Run,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    ema: ModelEmaV3 | None,
) -> _Progress:
    """The interrupted run's weights, optimiser, schedule, scaler and average loaded back; where it stood. A state
    made with other settings or data is refused."""
    state = load_resume_state(state_path)
    if state.get("fingerprint") != s.fingerprint:
        keys = differences(state.get("settings"), s.settings or {})
        raise CheckpointError(
            f"resume state {state_path} was made with other settings or data"
            f"{': ' + ', '.join(keys) if keys else ''}: rerun with --force to train afresh, or with the "
            "settings of that run"
        )
    if "model" in state:  # the weights saved with the state, as one unit (a kill between files cannot split them)
        load_weights(model, state["model"], state_path)
    else:
        weights, _ = load_checkpoint(run.dir / "last.safetensors", expect={"stage": s.stage})
        load_weights(model, weights, run.dir / "last.safetensors")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    if ema is not None:
        if "ema" not in state:
            raise CheckpointError(f"{state_path} has no weight average: resume with train.ema_decay=0 or anew")
        ema.module.load_state_dict(state["ema"])
    p = _Progress(int(state["epoch"]) + 1, float(state["best"]), float(state["best_tie"]), int(state["best_epoch"]),
                  int(state["stale"]))  # fmt: skip
    if state.get("finished"):
        p.start = s.epochs  # it had stopped early or run every epoch: nothing left to train
    if p.start >= s.epochs:  # never "resuming at epoch 7 of 6"
        logger.info("resuming: the run had finished after epoch %d of %d (best %s %.4f at epoch %d)",
                    int(state["epoch"]) + 1, s.epochs, s.monitor, p.best, p.best_epoch)  # fmt: skip
    else:
        logger.info("resuming at epoch %d of %d (best %s %.4f at epoch %d)", p.start + 1, s.epochs, s.monitor,
                    p.best, p.best_epoch)  # fmt: skip
    return p


def _state(
    epoch: int,
    p: _Progress,
    s: LoopSettings,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    ema: ModelEmaV3 | None,
    last_epoch: bool,
    stopped: bool,
) -> dict[str, Any]:
    """What ``last_state.pt`` holds after ``epoch``: everything a resume needs, with the weights as one unit."""
    return {
        "epoch": epoch,
        "best": p.best,
        "best_tie": p.best_tie,
        "best_epoch": p.best_epoch,
        "stale": p.stale,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "model": model.state_dict(),
        "fingerprint": s.fingerprint,
        **({"settings": dict(s.settings)} if s.settings is not None else {}),
        "finished": stopped or last_epoch,  # stopped early or ran every epoch: nothing left to resume
        "stopped": stopped,
        **({"ema": ema.module.state_dict()} if ema is not None else {}),
    }
