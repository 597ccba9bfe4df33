"""The classification stage as a library call: ``train(cfg) -> ClassifierRun``.

``python classification/train.py --backbone NAME`` parses its flags into a ``ClassificationConfig``, calls ``train``
and prints the result; ``dermpipe run`` calls it once per backbone with the experiment file's settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dermpipe.classification.config import ClassificationConfig
from dermpipe.classification.training import run_classification
from dermpipe.engine.cli import MissingInputError


def _score(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "n/a"


@dataclass(frozen=True)
class ClassifierRun:
    """One trained (or reused) backbone: its run folder and its scores on the held-out tables."""

    backbone: str
    run_dir: Path
    checkpoint: Path
    best_epoch: int
    val_balanced_accuracy: float | None  # of the monitored table (val, or out-of-fold with --folds)
    test_balanced_accuracy: float | None
    folds: int = 0  # K of K-fold training, 0 without
    combined: bool = False  # with folds: every fold finished and the shipped model made
    fold_models: str = ""  # with folds: "mean" (the fold models' mean) or "refit"
    oof_balanced_accuracy: float | None = None
    details: dict[str, Any] | None = None  # everything the training reported (tables, reports, ...)

    def line(self) -> str:
        scores = (f"val balanced accuracy {_score(self.val_balanced_accuracy)}, test balanced accuracy "
                  f"{_score(self.test_balanced_accuracy)}; wrote {self.run_dir}")  # fmt: skip
        if not self.combined:
            return f"classification {self.backbone}: best epoch {self.best_epoch}, {scores}"
        model = (f"the mean of the {self.folds} fold models" if self.fold_models == "mean"
                 else f"refitted on the whole training split, best epoch {self.best_epoch}")  # fmt: skip
        return (f"classification {self.backbone} over {self.folds} folds: out-of-fold balanced accuracy "
                f"{_score(self.oof_balanced_accuracy)}; {model}: {scores}")  # fmt: skip


def train(cfg: ClassificationConfig, *, resume: bool = False) -> ClassifierRun | None:
    """Train ``cfg.model.backbone`` (or its K folds) on the crops manifest into ``cfg.run.out_dir/<backbone>`` (a
    finished run with the same settings and data is reused); ``resume`` continues an interrupted one. ``None`` on a
    process other than rank 0 under torchrun (rank 0 reports)."""
    if not Path(cfg.data.manifest).is_file():
        raise MissingInputError(
            f"no crops manifest at {cfg.data.manifest}: make it with `python segmentation/predict.py --manifest "
            f"FILE --root {cfg.run.root}`, or pass --manifest FILE (any manifest, with --no-crop for whole images)"
        )
    result = run_classification(cfg, resume=resume)
    if "rank" in result:
        return None
    return ClassifierRun(
        backbone=cfg.model.backbone,
        run_dir=Path(result["run_dir"]),
        checkpoint=Path(result.get("checkpoint", Path(result["run_dir"]) / "best.safetensors")),
        best_epoch=int(result.get("best_epoch", 0)),
        val_balanced_accuracy=result.get("val_balanced_accuracy"),
        test_balanced_accuracy=result.get("test_balanced_accuracy"),
        folds=cfg.train.folds,
        combined=bool(result.get("combined")),
        fold_models=str(result.get("fold_models", "")),
        oof_balanced_accuracy=result.get("oof_balanced_accuracy"),
        details=result,
    )
