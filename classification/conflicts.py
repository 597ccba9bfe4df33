"""Whether a backbone's run folder holds a run of other settings or data than a config asks for (named before anything
is written)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from dermpipe.classification.config import ClassificationConfig
from dermpipe.classification.folds import (
    training_fingerprint,
    training_settings,
)
from dermpipe.engine.checkpoint import (
    CheckpointError,
    resume_summary,
)
from dermpipe.engine.claim import training_conflict
from dermpipe.engine.loop import STATE_FILE
from dermpipe.engine.rerun import Conflict, conflict


def _what(cfg: ClassificationConfig, fold: int | None) -> str:
    return f"{cfg.model.backbone} classifier" + (f" (fold {fold})" if fold is not None else "")


def _shipped_settings(cfg: ClassificationConfig) -> dict[str, Any]:
    """What the backbone folder of a K-fold run records: the settings and which model it ships (mean or refit)."""
    return {**training_settings(cfg, cfg.data.manifest, None), "train.fold_models": cfg.train.fold_models}


def classification_conflicts(cfg: ClassificationConfig) -> list[Conflict]:
    """Every run folder this backbone's training would write (the backbone's, each fold's) that holds a run made
    with other settings or data than ``cfg``."""
    backbone_dir = Path(cfg.run.out_dir) / cfg.model.backbone
    if not cfg.train.folds:
        settings = training_settings(cfg, cfg.data.manifest, None)
        found = training_conflict(
            backbone_dir, training_fingerprint(cfg, cfg.data.manifest, None), settings, _what(cfg, None)
        )
        return [found] if found is not None else []
    chosen = [cfg.train.fold] if cfg.train.fold >= 0 else list(range(cfg.train.folds))
    found = [
        training_conflict(
            backbone_dir / f"fold{i}",
            training_fingerprint(cfg, cfg.data.manifest, i),
            training_settings(cfg, cfg.data.manifest, i),
            _what(cfg, i),
        )
        for i in chosen
    ]
    if cfg.train.fold >= 0 or (cfg.train.fold_models == "refit" and _holds_fold_mean(backbone_dir)):
        pass  # one fold alone ships nothing; a fold mean is made again alike from the folds: a refit may replace it
    elif cfg.train.fold_models == "refit":
        plain = replace(cfg, train=replace(cfg.train, folds=0, fold=-1))
        key = training_fingerprint(plain, cfg.data.manifest, None)
        found.append(training_conflict(backbone_dir, key, _shipped_settings(cfg), _what(cfg, None)))
    else:
        found.append(_fold_mean_conflict(cfg, backbone_dir))
    return [c for c in found if c is not None]


def _holds_fold_mean(backbone_dir: Path) -> bool:
    try:
        return str(resume_summary(backbone_dir / STATE_FILE).get("fingerprint", "")).startswith("fold mean ")
    except CheckpointError:
        return False


def _fold_mean_conflict(cfg: ClassificationConfig, backbone_dir: Path) -> Conflict | None:
    """The backbone folder of a fold mean holds another model: a trained one (a plain run or a refit), or a fold
    mean of other settings. An older fold mean records no settings: its folds are checked on their own."""
    try:
        state = resume_summary(backbone_dir / STATE_FILE)
    except CheckpointError:
        return None
    mean = str(state.get("fingerprint", "")).startswith("fold mean ")
    recorded, expected = state.get("settings"), _shipped_settings(cfg)
    if (mean and recorded is None) or recorded == expected:
        return None
    return conflict(backbone_dir, _what(cfg, None), bool(state.get("finished")), recorded, expected)
