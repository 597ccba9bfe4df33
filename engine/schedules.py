"""Learning-rate schedules with one meaning for every stage: warm-up, then cosine or one-cycle decay (Smith 2018).

``cosine``: linear warm-up from ``1/warmup`` of the rate, then cosine decay to 0. ``onecycle``: the learning rate of
Smith's one-cycle policy exactly as torch's ``OneCycleLR`` draws it (cosine warm-up from 1/25 of the peak, cosine
annealing to 1/(25 x 10^4) of it), with the momentum (Adam's beta1, SGD's momentum) cycled inversely between 0.95
and 0.85 as it does. The decay runs over the steps after the first
warm-up; a second phase (the backbone unfrozen) warms up again from its first step at ``phase_scale`` x the rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("cosine", "onecycle")
ONECYCLE_START = 1.0 / 25.0  # torch's OneCycleLR div_factor
ONECYCLE_END = ONECYCLE_START / 1.0e4  # and its final_div_factor
MOMENTUM_RANGE = (0.85, 0.95)  # OneCycleLR's base_momentum and max_momentum: high while the rate is low


@dataclass(frozen=True)
class Schedule:
    """A schedule in optimiser steps: ``factor(step)`` is the learning rate as a fraction of the configured one."""

    kind: str
    total_steps: int
    warmup_steps: int
    phase_start: int = 0  # the step where a second phase (unfrozen backbone) begins; 0 = one phase
    phase_scale: float = 1.0  # the learning rate of the second phase as a fraction of the first

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule {self.kind!r} is not one of {list(SCHEDULES)}")

    def factor(self, step: int) -> float:
        in_phase = bool(self.phase_start) and step >= self.phase_start
        scale = self.phase_scale if in_phase else 1.0
        into = step - (self.phase_start if in_phase else 0)
        warmup = max(self.warmup_steps, 1)
        if self.kind == "onecycle":  # as OneCycleLR: the peak at step warmup - 1, the floor at the last step
            warm = _cosine_between(ONECYCLE_START, 1.0, into / (warmup - 1)) if into < warmup - 1 else 1.0
            progress = _clamp((step - warmup + 1) / max(self.total_steps - warmup, 1))
            return scale * warm * _cosine_between(1.0, ONECYCLE_END, progress)
        warm = (into + 1) / warmup if into < warmup else 1.0
        return scale * warm * _cosine_between(1.0, 0.0, _clamp((step - warmup) / max(self.total_steps - warmup, 1)))

    def momentum(self, step: int) -> float | None:
        """The momentum at ``step`` for ``onecycle`` (``None``: the optimiser's own, unchanged)."""
        if self.kind != "onecycle":
            return None
        in_phase = bool(self.phase_start) and step >= self.phase_start
        into = step - (self.phase_start if in_phase else 0)
        warmup = max(self.warmup_steps, 1)
        if into < warmup - 1:
            rate = _cosine_between(0.0, 1.0, into / (warmup - 1))  # the rate's place between its floor and peak
        else:
            rate = _cosine_between(1.0, 0.0, _clamp((step - warmup + 1) / max(self.total_steps - warmup, 1)))
        low, high = MOMENTUM_RANGE
        return high - (high - low) * rate

    def scheduler(self, optimizer: torch.optim.Optimizer) -> ScheduledLR:
        """A per-step scheduler; its state (the step count) travels in the resume state."""
        return ScheduledLR(optimizer, self)


class ScheduledLR(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` over a ``Schedule``, which also sets the momentum where the schedule cycles it."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Schedule) -> None:
        self.schedule = schedule
        super().__init__(optimizer, schedule.factor)

    def step(self, epoch: int | None = None) -> None:
        super().step(epoch)
        momentum = self.schedule.momentum(self.last_epoch)
        if momentum is None:
            return
        for group in self.optimizer.param_groups:
            if "betas" in group:
                group["betas"] = (momentum, *group["betas"][1:])
            elif "momentum" in group:
                group["momentum"] = momentum

    def state_dict(self) -> dict:
        """The step count and learning rates only (the schedule is rebuilt from the config, never unpickled)."""
        return {k: v for k, v in super().state_dict().items() if k != "schedule"}


def _clamp(progress: float) -> float:
    return min(max(progress, 0.0), 1.0)


def _cosine_between(start: float, end: float, progress: float) -> float:
    """From ``start`` at progress 0 to ``end`` at progress 1 along half a cosine (torch's ``_annealing_cos``)."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * progress) + 1.0)
