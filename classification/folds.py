"""Which rows a classifier run fits, early-stops on and predicts: the plain split or K lesion-grouped folds, and the
out-of-fold table combined from the K fold models."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from dermpipe.classification.config import ClassificationConfig, effective_freeze_epochs
from dermpipe.classification.evaluation import save_report
from dermpipe.classification.metrics import classification_report, format_report
from dermpipe.classification.probability_tables import combined_digest, read_probability_table, write_probability_table
from dermpipe.configs.loader import to_dict
from dermpipe.data.manifest import Manifest, ManifestError
from dermpipe.data.splits import assign_folds
from dermpipe.engine.checkpoint import weights_digest
from dermpipe.engine.claim import finished_state
from dermpipe.engine.files import file_digest
from dermpipe.engine.loop import fingerprint
from dermpipe.engine.rerun import recorded_settings

logger = logging.getLogger(__name__)

# Settings that change what is predicted or drawn after training, not the trained weights.
AFTER_TRAINING = ("tta", "gradcam_images", "eval_batch_size", "fold", "fold_models", "ood_percentile")


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


def mean_rows(manifest: Manifest, k: int) -> SplitRows:
    """The rows of the K fold models' mean: its val and test tables (val also for Grad-CAM); it fits nothing."""
    train, val = manifest.select("train", labelled=True), manifest.select("val", labelled=True)
    tables = {"val": val, "test": manifest.select("test")}
    return SplitRows(train, val, {k: v for k, v in tables.items() if len(v)}, f"train (mean of the {k} fold models)")


def row_keys(rows: Manifest, column: str) -> list[str]:
    """The content key of each row's input: the crop's stage key, or the file digest of a whole image or crop."""
    return [r["crop_key"] if column == "crop_path" and r.get("crop_key") else file_digest(r[column]) for r in rows.rows]


def training_fingerprint(cfg: ClassificationConfig, manifest_path: str, fold: int | None) -> str:
    """What decides the trained weights: data/model/train settings, seed, manifest bytes and fold."""
    return fingerprint(_training_payload(cfg, fold), manifest_path)


def training_settings(cfg: ClassificationConfig, manifest_path: str, fold: int | None) -> dict[str, Any]:
    """The settings the fingerprint stands for, as dotted keys with the manifest's digest: what a run records."""
    return recorded_settings(_training_payload(cfg, fold), manifest_path)


def _training_payload(cfg: ClassificationConfig, fold: int | None) -> dict[str, Any]:
    train = {k: v for k, v in asdict(cfg.train).items() if k not in AFTER_TRAINING}
    train["freeze_epochs"] = effective_freeze_epochs(cfg)  # auto (null) and the number it stands for train alike
    payload = {
        "data": to_dict(cfg.data),
        "model": to_dict(cfg.model),
        "train": train,
        "seed": cfg.run.seed,
        "fold": fold,
    }
    return payload


def stale_folds(cfg: ClassificationConfig, backbone_dir: Path, k: int) -> list[int]:
    """Folds not yet trained with these settings and data (or whose out-of-fold table is missing or outdated)."""
    stale = []
    for i in range(k):
        fold_dir = backbone_dir / f"fold{i}"
        key = training_fingerprint(cfg, cfg.data.manifest, i)
        state = finished_state(fold_dir, key, warn=False)
        table = fold_dir / "probs_oof.json"
        current = state is not None and table.is_file()
        if not current or json.loads(table.read_text()).get("weights_digest") != weights_digest(
            fold_dir / "best.safetensors"
        ):
            stale.append(i)
    return stale


def combine_folds(cfg: ClassificationConfig, backbone_dir: Path, k: int) -> dict[str, Any] | None:
    """Once every fold is done: one out-of-fold table over the whole training split in ``backbone_dir``
    (``probs_oof``), each row predicted by the fold model that did not train on it. The val and test tables come from
    the model prediction uses (``run_classification``): the mean of the fold models, or one refitted on the whole
    training split (``train.fold_models``). Returns ``None`` while a fold is missing."""
    fold_dirs = [backbone_dir / f"fold{i}" for i in range(k)]
    if stale_folds(cfg, backbone_dir, k):
        return None
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
    ids = [i for p in oof for i in p[0]]
    keys = [c for p in oof for c in p[1]]
    labels = [lab for p in oof for lab in p[2]]
    probs = np.concatenate([p[3] for p in oof])
    meta = {
        "backbone": cfg.model.backbone,
        "source": "oof",
        "trained_on": f"train ({k} folds; each row predicted by the model that did not see its fold)",
        "weights_digest": combined_digest(digests),
        "settings": {**oof[0][4]["settings"], "folds": k},
        "fold_tables": [p[4]["table_key"] for p in oof],
    }
    result["tables"]["oof"] = str(write_probability_table(backbone_dir, "oof", ids, keys, labels, probs, classes, meta))
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index.get(lab, -1) for lab in labels])
    if (y >= 0).any():
        report = classification_report(y[y >= 0], probs[y >= 0], classes)
        result["reports"]["oof"] = report
        save_report(report, backbone_dir, "oof", classes)
        logger.info("%d folds, out of fold: %s", k, format_report(report))
    return result
