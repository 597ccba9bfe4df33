"""Training one backbone on the lesion crops through the engine's loop: freeze-then-unfreeze fine-tuning, class
balancing, early stopping on validation balanced accuracy, then reports, probability tables and Grad-CAM.

The run folder gets best/last checkpoints, ``last_state.pt`` for ``--resume``, ``metrics.csv``, learning curves,
confusion matrices, Grad-CAM overlays and the probability tables the ensemble stacks (validation and test, plus
out-of-fold ones with K folds).
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dermpipe.classification.backbones import (
    STAGE,
    LesionClassifier,
    build_classifier,
    load_classifier,
    resolve_backbone,
    save_fold_mean,
)
from dermpipe.classification.config import ClassificationConfig, effective_freeze_epochs
from dermpipe.classification.conflicts import _holds_fold_mean, _shipped_settings, _what, classification_conflicts
from dermpipe.classification.epochs import METRIC_COLUMNS, ClassificationStage, build_optimizer
from dermpipe.classification.evaluation import save_report
from dermpipe.classification.folds import (
    SplitRows,
    combine_folds,
    image_column,
    mean_rows,
    read_training_manifest,
    row_keys,
    split_rows,
    stale_folds,
    training_fingerprint,
    training_settings,
)
from dermpipe.classification.gradcam import refresh_gradcam
from dermpipe.classification.losses import build_loss
from dermpipe.classification.metrics import classification_report, format_report, per_class_table, plot_learning_curves
from dermpipe.classification.ood import fit_after_training
from dermpipe.classification.prediction import CropProbabilities
from dermpipe.classification.probability_tables import combined_digest, probability_table
from dermpipe.configs.loader import ConfigError
from dermpipe.data.augment import build_transform
from dermpipe.data.balance import class_weights
from dermpipe.data.loaders import ClassificationDataset
from dermpipe.data.manifest import Manifest
from dermpipe.data.reading import read_image
from dermpipe.engine.cache import StageCache
from dermpipe.engine.checkpoint import (
    read_metadata,
    save_resume_state,
    weights_digest,
)
from dermpipe.engine.claim import claim_run, finished_state, unfinished
from dermpipe.engine.distributed import is_main, rank
from dermpipe.engine.files import write_text_atomic
from dermpipe.engine.lineage import file_sha256, read_lineage, write_lineage
from dermpipe.engine.loop import STATE_FILE, LoopSettings, fit, read_metrics
from dermpipe.engine.rerun import refuse_all
from dermpipe.engine.run import Run, start_stage_run
from dermpipe.engine.schedules import Schedule

logger = logging.getLogger(__name__)


def train_fold(
    cfg: ClassificationConfig,
    run: Run,
    manifest: Manifest,
    fold: int | None,
    resume: bool,
    record: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train (or reuse, or resume) one model in ``run.dir``, then evaluate it and write its probability tables.
    ``record``: the settings the run records, when not ``cfg``'s own (a refit records its K-fold run's)."""
    classes = manifest.classes
    column = image_column(cfg)
    rows = split_rows(manifest, cfg, fold)
    key = training_fingerprint(cfg, cfg.data.manifest, fold)
    settings = dict(record) if record is not None else training_settings(cfg, cfg.data.manifest, fold)
    if record is not None and not resume and _holds_fold_mean(run.dir):  # made again alike from the folds, kept
        finished, note = None, f"replacing the mean of the fold models in {run.dir} by a model refitted on train"
    else:
        finished, note = claim_run(run.dir, key, settings, _what(cfg, fold), cfg.run.force, resume)
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
    dataset = _datasets(cfg, size, mean, std)
    monitor_ds = dataset(rows.monitor)
    if model is None:
        logger.info("training already finished with these settings in %s; reusing it (--force retrains)", run.dir)
        history = read_metrics(run.dir / "metrics.csv", METRIC_COLUMNS, 10**9)
    else:
        fit_ds = dataset(rows.fit, build_transform(cfg.data.augment, size, train=True, mean=mean, std=std))
        history = _fit(cfg, run, model, rows, fit_ds, monitor_ds, classes, fold, key, settings, resume, note)
    if not is_main():  # under torchrun rank 0 alone evaluates and writes the tables
        return {"run_dir": str(run.dir), "rank": rank()}
    return _after_training(cfg, run, rows, monitor_ds, dataset, classes, column, history)


def _datasets(
    cfg: ClassificationConfig, size: int, mean: Sequence[float], std: Sequence[float]
) -> Callable[..., ClassificationDataset]:
    """``dataset(rows, transform=evaluation transform)``: the rows' images at ``size`` through the resize cache."""
    eval_tf = build_transform(cfg.data.augment, size, train=False, mean=mean, std=std)
    cache_root, pre, force, column = Path(cfg.run.cache_dir), cfg.data.preprocess, cfg.run.force, image_column(cfg)

    def dataset(subset: Manifest, transform: Any = None) -> ClassificationDataset:
        tf = eval_tf if transform is None else transform
        return ClassificationDataset(subset, size, cache_root, tf, pre, image_column=column, force=force)

    return dataset


def fold_mean(cfg: ClassificationConfig, manifest: Manifest, backbone_dir: Path, k: int) -> dict[str, Any]:
    """The K fold models as one classifier in ``backbone_dir`` (``train.fold_models: mean``): its checkpoint (a
    ``FoldMeanClassifier``, rewritten only when a fold model changed), its val and test tables through the per-crop
    cache, reports and Grad-CAM, and the folds' ``metrics.csv`` rows under one ``fold`` column."""
    run = start_stage_run(cfg, "classification", backbone_dir)
    run.begin()
    fold_paths = [backbone_dir / f"fold{i}" / "best.safetensors" for i in range(k)]
    digests = [weights_digest(p) for p in fold_paths]
    path, state_path = backbone_dir / "best.safetensors", backbone_dir / STATE_FILE
    marker = f"fold mean {combined_digest(digests)}"
    rows = mean_rows(manifest, k)
    if finished_state(backbone_dir, marker, warn=False) is None:
        if path.is_file():
            logger.warning("%s holds another model (a refit, or other folds); replacing it by the mean of the %d "
                           "fold models", path, k)  # fmt: skip
        save_fold_mean(path, fold_paths, digests, config_hash=run.config_hash, trained_on=rows.trained_on)
        save_resume_state(state_path, {"finished": True, "fingerprint": marker, "settings": _shipped_settings(cfg)})
    text = io.StringIO()
    writer = csv.DictWriter(text, ["fold", *METRIC_COLUMNS], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for i in range(k):
        for row in read_metrics(fold_paths[i].parent / "metrics.csv", METRIC_COLUMNS, 10**9):
            writer.writerow({"fold": i, **row})
    metrics = backbone_dir / "metrics.csv"
    if not metrics.is_file() or metrics.read_text() != text.getvalue():
        write_text_atomic(metrics, text.getvalue())
    meta = read_metadata(path)
    dataset = _datasets(cfg, int(meta["input_size"]), tuple(meta["mean"]), tuple(meta["std"]))
    return _after_training(cfg, run, rows, dataset(rows.monitor), dataset, manifest.classes, image_column(cfg), [])


def _fit(
    cfg: ClassificationConfig,
    run: Run,
    model: LesionClassifier,
    rows: SplitRows,
    train_ds: ClassificationDataset,
    monitor_ds: ClassificationDataset,
    classes: Sequence[str],
    fold: int | None,
    key: str,
    settings: Mapping[str, Any],
    resume: bool,
    note: str = "",
) -> list[dict[str, Any]]:
    """Loss, optimiser and schedule for this backbone, then the engine's loop; returns the history."""
    t = cfg.train
    freeze = effective_freeze_epochs(cfg)
    if t.freeze_epochs is None:
        logger.info(
            "train.freeze_epochs auto: %d head-only epoch(s) (%s)",
            freeze,
            "pretrained weights" if cfg.model.pretrained else "training from scratch",
        )
    counts = np.bincount(train_ds.labels, minlength=len(classes))
    weights = class_weights(counts, cfg.data.balance.class_weights, cfg.data.balance.effective_beta)
    if cfg.data.balance.sampler != "none" and cfg.data.balance.class_weights != "none":
        logger.warning("both a balancing sampler and class weights are on: the rare classes are boosted twice")
    loss_fn = build_loss(cfg, torch.as_tensor(weights, dtype=torch.float32)).to(run.device)
    meta_extra = {
        "config_hash": run.config_hash,
        "fold": fold,
        "trained_on": rows.trained_on,
        "image_column": image_column(cfg),
        "preprocess": asdict(cfg.data.preprocess),
        # what made the training crops (segmentation/predict.py records it): batch prediction crops alike
        "crops": rows.fit.info.get("crops") if image_column(cfg) == "crop_path" else None,
    }
    stage = ClassificationStage(cfg, run, model, train_ds, monitor_ds, classes, meta_extra)
    logger.info("train.batchnorm %s: %s", t.batchnorm, stage.batchnorm)
    if t.bn_momentum:
        for module in model.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = t.bn_momentum
    model.to(run.device)
    if run.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    loop = LoopSettings.from_train(
        t,
        cfg.run.seed,
        columns=METRIC_COLUMNS,
        monitor="val_balanced_accuracy",
        tie_break="val_loss",
        patience_from=freeze,
        fingerprint=key,
        stage=STAGE,
        settings=settings,
        note=note,
    )
    steps = loop.steps_per_epoch(len(stage.first))
    # the head-only phase ends at freeze_epochs; the whole network then warms up again at unfreeze_lr_scale x lr
    unfreeze = freeze * steps if 0 < freeze < t.epochs else 0
    schedule = Schedule(t.schedule, t.epochs * steps, int(t.warmup_epochs * steps), unfreeze, t.unfreeze_lr_scale)
    return fit(stage, model, loss_fn, optimizer, schedule.scheduler(optimizer), run, loop, resume).history


def _after_training(
    cfg: ClassificationConfig,
    run: Run,
    rows: SplitRows,
    monitor_ds: ClassificationDataset,
    dataset: Any,
    classes: Sequence[str],
    column: str,
    history: list[dict[str, Any]],
) -> dict[str, Any]:
    """Best checkpoint -> probability tables (through the per-crop cache), reports, curves and Grad-CAM."""
    best_path = run.dir / "best.safetensors"
    model, meta = load_classifier(best_path, run.device)
    if run.channels_last:
        model.to(memory_format=torch.channels_last)
    cache = StageCache(cfg.run.cache_dir, "crop_probabilities", force=cfg.run.force)
    predictor = CropProbabilities(
        model,
        weights_digest(best_path),
        cache,
        tta=cfg.train.tta,
        preprocess_cfg=cfg.data.preprocess,
        batch_size=cfg.train.eval_batch_size or 2 * cfg.train.batch_size,
        device=run.device,
        amp=run.amp,
        channels_last=run.channels_last,
        features=bool(cfg.train.ood_percentile),  # kept for the out-of-distribution check below
    )
    reports: dict[str, dict[str, Any]] = {}
    tables: dict[str, str] = {}
    for name, subset in rows.tables.items():
        ds = monitor_ds if subset is rows.monitor else dataset(subset)
        probs, path = probability_table(
            predictor,
            ds,
            run_dir=run.dir,
            split=name,
            ids=[r["image_id"] for r in subset.rows],
            crop_keys=row_keys(subset, column),
            labels=[r.get("label", "") for r in subset.rows],
            classes=classes,
            source=name,
            trained_on=rows.trained_on,
            settings={"image_column": column},
        )
        tables[name] = str(path)
        labelled = ds.labels >= 0
        if labelled.any():
            report = classification_report(ds.labels[labelled], probs[labelled], classes)
            reports[name] = report
            save_report(report, run.dir, name, classes)
            logger.info("%s: %s\n%s", name, format_report(report), per_class_table(report))
    fit_after_training(predictor, run.dir, rows, dataset, column, cfg.train.ood_percentile)
    cache.log_summary()
    plot_learning_curves(history, run.dir / "learning_curves.png")
    digest = file_sha256(best_path)
    if cfg.train.gradcam_images and len(rows.monitor):
        chosen = rows.monitor.rows[: cfg.train.gradcam_images]
        images = [read_image(r[column], max_side=1024) for r in chosen]  # whole images (--no-crop) can be huge
        chosen_ids, labels = [r["image_id"] for r in chosen], [r.get("label", "") for r in chosen]
    else:
        images, chosen_ids, labels = [], [], []
    refresh_gradcam(model, images, chosen_ids, labels, classes, run.dir / "gradcam", digest, cfg.data.preprocess)
    _write_lineage(cfg, run.dir, digest, column)
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


def _write_lineage(cfg: ClassificationConfig, run_dir: Path, weights: str, column: str) -> None:
    """``run_dir/lineage.json``: the crops manifest it trained on (with the manifest the crops came from, as the
    crops folder's lineage records it), or the manifest of whole images, and its weights."""
    trained_on = file_sha256(cfg.data.manifest)
    consumed = {"manifest": trained_on}
    if column == "crop_path":
        crops = read_lineage(Path(cfg.data.manifest).parent) or {"consumed": {}}
        consumed = {"crops_manifest": trained_on}
        if "manifest" in crops["consumed"]:
            consumed["manifest"] = crops["consumed"]["manifest"]
    write_lineage(run_dir, "classification", consumed, {"weights": weights})


def run_classification(cfg: ClassificationConfig, resume: bool = False) -> dict[str, Any]:
    """Train one backbone (or its K folds) into ``<run.out_dir>/<backbone>[/fold<i>]``; returns the summary."""
    resolve_backbone(cfg.model.backbone)  # an unknown name fails before any run folder is made
    manifest = read_training_manifest(cfg)
    if not cfg.run.force:  # every folder of other settings named before any is written (--force replaces them)
        refuse_all(classification_conflicts(cfg), False, "choose another --out/--root")
    backbone_dir = Path(cfg.run.out_dir) / cfg.model.backbone

    def start(path: Path) -> Run:
        return start_stage_run(cfg, "classification", path)

    if not cfg.train.folds:
        return train_fold(cfg, start(backbone_dir), manifest, None, resume)
    k = cfg.train.folds
    if is_main():
        backbone_dir.mkdir(parents=True, exist_ok=True)
        manifest.write(backbone_dir / "folds.csv")
    chosen = [cfg.train.fold] if cfg.train.fold >= 0 else list(range(k))
    folds = []
    for i in chosen:  # with --resume, each fold that was cut resumes; the others are reused or trained
        fold_dir = backbone_dir / f"fold{i}"
        folds.append(train_fold(cfg, start(fold_dir), manifest, i, resume and unfinished(fold_dir)))
    if not is_main():
        return folds[-1]
    combined = combine_folds(cfg, backbone_dir, k)
    summary = dict(folds[-1])
    summary.update({"folds": folds, "run_dir": folds[-1]["run_dir"]})
    if combined is not None and cfg.train.fold < 0:
        if cfg.train.fold_models == "mean":
            # the models the out-of-fold vote learned from make the tables it is applied to, and predict
            shipped = fold_mean(cfg, manifest, backbone_dir, k)
        else:
            # refitted on the whole training split (stopped on val), as scikit-learn's StackingClassifier refits its
            # estimators after cross_val_predict; the fold models only give the out-of-fold table
            plain = replace(cfg, train=replace(cfg.train, folds=0, fold=-1))
            shipped = train_fold(plain, start_stage_run(plain, "classification", backbone_dir), manifest, None,
                                 resume and unfinished(backbone_dir), _shipped_settings(cfg))  # fmt: skip
        summary.update(shipped)
        summary.update({"folds": folds, "run_dir": str(backbone_dir)})
        summary["tables"] = {**shipped.get("tables", {}), **combined["tables"]}
        summary["oof_balanced_accuracy"] = combined["reports"].get("oof", {}).get("balanced_accuracy")
        summary["combined"] = True
        summary["fold_models"] = cfg.train.fold_models
    else:
        logger.info(
            "folds %s still to train before the out-of-fold table is complete", stale_folds(cfg, backbone_dir, k)
        )
        summary["combined"] = False
    return summary
