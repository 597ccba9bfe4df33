"""The allowed range of every numeric setting that counts, sizes, or waits: one table, checked when a config loads.

A setting is found by its key's last part (``train.batch_size`` -> ``batch_size``), or by ``Section.name`` where one
name means different things in different sections; the same table checks the numeric flags of the commands
(``--port``, ``--merge-timeout``). A value out of range fails before any work with one line naming the key, the value
and the range.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """Inclusive bounds (``None``: unbounded) and what the ends mean, for the message."""

    low: float | None = None
    high: float | None = None
    note: str = ""

    def __str__(self) -> str:
        if self.high is None:
            text = f">= {self.low:g}"
        elif self.low is None:
            text = f"<= {self.high:g}"
        else:
            text = f"{self.low:g}..{self.high:g}"
        return f"{text} ({self.note})" if self.note else text

    def holds(self, value: float) -> bool:
        if isinstance(value, float) and math.isnan(value):
            return False
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)


AT_LEAST_ONE = Range(1)
NOT_NEGATIVE = Range(0)

RANGES: Mapping[str, Range] = {
    # counts and sizes of batches, epochs, workers and threads
    "batch_size": AT_LEAST_ONE,
    "eval_batch_size": Range(0, note="0 = 2 x batch_size"),
    "epochs": AT_LEAST_ONE,
    "num_workers": Range(0, note="0 = read in the main process"),
    "threads": Range(0, note="0 = torch's default"),
    "max_steps_per_epoch": Range(0, note="0 = the whole epoch"),
    "patience": Range(0, note="0 = no early stopping"),
    "warmup_epochs": NOT_NEGATIVE,
    "freeze_epochs": NOT_NEGATIVE,
    # image and crop sizes, in pixels
    "image_size": AT_LEAST_ONE,
    "ClsDataConfig.image_size": Range(0, note="0 = the backbone's native size"),
    "crop_size": AT_LEAST_ONE,
    "decoder_channels": AT_LEAST_ONE,
    # how many pictures, resamples, bins and units
    "report_max_images": Range(0, note="0 = no pictures in the report"),
    "panel_images": NOT_NEGATIVE,
    "gradcam_images": NOT_NEGATIVE,
    "bootstrap": Range(0, note="0 = no intervals"),
    "ece_bins": AT_LEAST_ONE,
    "hidden": AT_LEAST_ONE,
    "hidden_grid": AT_LEAST_ONE,
    "cv_folds": Range(2),
    "kmeans_clusters": AT_LEAST_ONE,
    "oversample_target": Range(0, note="0 = off"),
    "undersample_target": Range(0, note="0 = off"),
    "se_reduction": Range(0, note="0 = no SE block"),
    # pixel sizes, degrees and grey levels of preprocessing and augmentation
    "hair_kernel": Range(3, note="pixels"),
    "hair_threshold": Range(0, 255, "grey levels"),
    "shades_of_gray_p": AT_LEAST_ONE,
    "rotate_limit": Range(0, 180, "degrees"),
    # rates, weights and fractions that cannot be negative, and those that are fractions of one
    "lr": NOT_NEGATIVE,
    "weight_decay": NOT_NEGATIVE,
    "weight_decay_grid": NOT_NEGATIVE,
    "grad_clip": Range(0, note="0 = off"),
    "dice_weight": NOT_NEGATIVE,
    "bce_weight": NOT_NEGATIVE,
    "lovasz_weight": NOT_NEGATIVE,
    "focal_gamma": NOT_NEGATIVE,
    "unfreeze_lr_scale": NOT_NEGATIVE,
    "margin": NOT_NEGATIVE,
    "selection_se": NOT_NEGATIVE,
    "prefer_simpler_within": NOT_NEGATIVE,
    "ema_decay": Range(0, 1, "0 = off"),
    "momentum": Range(0, 1),
    "threshold": Range(0, 1),
    "min_area": Range(0, 1, "a fraction of the image"),
    "target_sensitivity": Range(0, 1),
    "ood_percentile": Range(0, 100),
    "bn_momentum": Range(0, 1, "0 = each layer's own"),
    "bn_reestimate_batches": AT_LEAST_ONE,
    # the commands' numeric flags
    "port": Range(0, 65535, "0 = any free port"),
    "merge_timeout": Range(0, note="in seconds"),
    "num_shards": AT_LEAST_ONE,
    "shard_index": NOT_NEGATIVE,
    "max_files": AT_LEAST_ONE,
    "max_queue": AT_LEAST_ONE,
    "batch_wait_ms": NOT_NEGATIVE,
}


def range_of(name: str, section: str = "") -> Range | None:
    """The range of the setting ``name`` in the config section class named ``section``, or ``None``."""
    return RANGES.get(f"{section}.{name}") or RANGES.get(name)


def range_problem(key: str, value: Any, bounds: Range | None) -> str:
    """``"<key> = <value> is out of range: allowed <range>"`` when ``value`` (a number, or a list of numbers) lies
    outside ``bounds``, else ``""``."""
    if bounds is None or value is None:
        return ""
    values = value if isinstance(value, tuple | list) else (value,)
    for item in values:
        if isinstance(item, int | float) and not isinstance(item, bool) and not bounds.holds(item):
            return f"{key} = {value!r} is out of range: allowed {bounds}"
    return ""


def check_ranges(cls: type, values: Mapping[str, Any], prefix: str = "") -> None:
    """Raise ``ValueError`` naming the first numeric setting in ``values`` (field name -> value, for the config section
    class ``cls``) whose value is out of its range."""
    for name, value in values.items():
        problem = range_problem(f"{prefix}{name}", value, range_of(name, cls.__name__))
        if problem:
            raise ValueError(f"{problem} (fix the config file or --set)")


def check_flags(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` naming the first numeric flag of a parsed command line whose value is out of range."""
    for name, value in vars(args).items():
        problem = range_problem(f"--{name.replace('_', '-')}", value, RANGES.get(name))
        if problem:
            raise ValueError(problem)
