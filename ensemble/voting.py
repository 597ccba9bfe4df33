"""The stacking run: learn the vote on held-out probabilities, choose everything inside that set, score every method
once on the test split, and write the comparison table, confusion matrix, reliability diagram and meta-network.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, log_loss, roc_auc_score

from dermpipe.configs.loader import config_hash, to_dict
from dermpipe.engine.cache import stage_key
from dermpipe.engine.files import write_text_atomic
from dermpipe.engine.run import Run
from dermpipe.ensemble.baselines import best_single, logistic_stacking, majority_vote, mean_vote
from dermpipe.ensemble.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    refer_threshold,
    referral_outcome,
    reliability_diagram,
)
from dermpipe.ensemble.config import EnsembleConfig
from dermpipe.ensemble.meta import fit_meta, meta_logits, save_meta, select_meta_settings, softmax
from dermpipe.ensemble.tables import StackedTable, TableError, check_fit_and_test_agree, load_probability_tables

logger = logging.getLogger(__name__)

META_FILE = "meta.safetensors"
METRIC_COLUMNS: tuple[str, ...] = ("balanced_accuracy", "macro_auc", "macro_f1", "accuracy", "log_loss", "ece")


def method_metrics(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str], n_bins: int = 15) -> dict[str, float]:
    """ISIC-style scores of (images, classes) probabilities: balanced accuracy (mean per-class recall), macro
    one-vs-rest AUC over the classes present, macro F1, accuracy, log-loss, ECE, and per-class recall and AUC.
    """
    probs = probs / probs.sum(axis=1, keepdims=True)
    predicted = probs.argmax(axis=1)
    recalls, aucs = {}, {}
    for c, name in enumerate(classes):
        positive = labels == c
        recalls[name] = float((predicted[positive] == c).mean()) if positive.any() else float("nan")
        both = positive.any() and (~positive).any()
        aucs[name] = float(roc_auc_score(positive, probs[:, c])) if both else float("nan")
    present = [r for r in recalls.values() if not np.isnan(r)]
    scored_aucs = [a for a in aucs.values() if not np.isnan(a)]
    out = {
        "balanced_accuracy": float(np.mean(present)),
        "macro_auc": float(np.mean(scored_aucs)) if scored_aucs else float("nan"),
        "macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
        "accuracy": float((predicted == labels).mean()),
        "log_loss": float(log_loss(labels, np.clip(probs, 1e-12, 1.0), labels=list(range(len(classes))))),
        "ece": expected_calibration_error(probs, labels, n_bins),
    }
    out.update({f"recall_{name}": r for name, r in recalls.items()})
    out.update({f"auc_{name}": a for name, a in aucs.items()})
    return out


INTERVAL_COLUMNS: tuple[str, ...] = (
    "balanced_accuracy_low",
    "balanced_accuracy_high",
    "delta_vs_best_single",
    "delta_low",
    "delta_high",
    "p_better_than_best_single",
)


def bootstrap_balanced_accuracy(
    labels: np.ndarray,
    predictions: dict[str, np.ndarray],
    reference: str,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Paired, class-stratified bootstrap of balanced accuracy on the same test images.

    Each resample draws images with replacement inside every true class (class sizes stay fixed, as balanced accuracy
    weighs every class equally), and every method is scored on the same resample, so the interval of a method's
    difference to ``reference`` accounts for their shared images. Returns per method the percentile interval of its
    balanced accuracy, its point difference to the reference with the interval of that difference, and the share of
    resamples in which it scored above the reference.
    """
    names = list(predictions)
    correct = np.stack([np.asarray(predictions[n]) == labels for n in names])  # methods x images
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    rng = np.random.default_rng(seed)
    scores = np.empty((samples, len(names)))
    for i in range(samples):
        recalls = [correct[:, rng.choice(m, size=m.size)].mean(axis=1) for m in members]
        scores[i] = np.mean(recalls, axis=0)
    point = np.mean([correct[:, m].mean(axis=1) for m in members], axis=0)
    ref = names.index(reference)
    diff = scores - scores[:, [ref]]
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(scores, [tail, 1.0 - tail], axis=0)
    diff_low, diff_high = np.quantile(diff, [tail, 1.0 - tail], axis=0)
    return {
        name: dict(
            zip(
                INTERVAL_COLUMNS,
                (
                    float(low[j]),
                    float(high[j]),
                    float(point[j] - point[ref]),
                    float(diff_low[j]),
                    float(diff_high[j]),
                    float((diff[:, j] > 0).mean()),
                ),
            )
        )
        for j, name in enumerate(names)
    }


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def _format(value: Any) -> Any:
    return f"{value:.6f}" if isinstance(value, float) else value


def write_methods_table(path: Path, rows: Sequence[dict[str, Any]], classes: Sequence[str]) -> Path:
    """``method, balanced_accuracy, macro_auc, macro_f1, accuracy, log_loss, ece``, the bootstrap interval columns
    when computed, ``recall_<class>..., auc_<class>..., detail``: one row per method, all on the same test images."""
    intervals = [c for c in INTERVAL_COLUMNS if any(c in row for row in rows)]
    header = ["method", *METRIC_COLUMNS, *intervals, *(f"recall_{c}" for c in classes), *(f"auc_{c}" for c in classes)]
    header.append("detail")
    return _write_csv(path, header, [[_format(row.get(h, "")) for h in header] for row in rows])


def write_confusion_matrix(labels: np.ndarray, predicted: np.ndarray, classes: Sequence[str], stem: Path) -> Path:
    """``<stem>.csv`` (rows true class, columns predicted) and ``<stem>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    matrix = confusion_matrix(labels, predicted, labels=list(range(len(classes))))
    csv_path = _write_csv(
        stem.with_suffix(".csv"),
        ["true\\predicted", *classes],
        [[name, *map(int, row)] for name, row in zip(classes, matrix)],
    )
    size = 2.5 + 0.6 * len(classes)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(matrix, display_labels=list(classes)).plot(ax=ax, colorbar=False, cmap="Blues")
    ax.set_title("meta-network, test split")
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    plt.close(fig)
    return csv_path


def _fit_rows(table: StackedTable) -> StackedTable:
    labelled = table.labelled()
    if len(labelled) < len(table):
        logger.warning("%d unlabelled %s images left out of fitting", len(table) - len(labelled), table.split)
    present = np.unique(labelled.labels)
    if len(present) < 2:
        raise TableError(
            f"the {table.split} tables hold labels of {len(present)} class(es) only: the vote needs held-out images of "
            f"at least two classes"
        )
    absent = [c for i, c in enumerate(table.classes) if i not in present]
    if absent:
        logger.warning("no labelled %s image of %s: the learned votes will never predict it", table.split, absent)
    return labelled


def _refer_class_index(cfg: EnsembleConfig, classes: Sequence[str], fit_labels: np.ndarray) -> int | None:
    if not cfg.calibration.refer:
        return None
    name = cfg.calibration.refer_class
    if name not in classes:
        raise TableError(
            f"calibration.refer_class {name!r} is not one of the classes {list(classes)}: pass "
            f"--set calibration.refer_class=NAME or --set calibration.refer=false"
        )
    index = list(classes).index(name)
    if not (fit_labels == index).any():
        raise TableError(
            f"no {name} image among the labelled held-out images, so no refer threshold can be chosen: add some or "
            f"pass --set calibration.refer=false"
        )
    return index


def table_digest(table: StackedTable) -> str:
    """sha256 over what the vote reads from one split: ids, labels, classes, backbone order and probabilities."""
    h = hashlib.sha256()
    for part in (table.split, table.ids, table.classes, table.backbones):
        h.update(json.dumps(part).encode())
    h.update(np.ascontiguousarray(table.labels, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(table.probs, dtype=np.float64).tobytes())
    return h.hexdigest()


def vote_key(cfg: EnsembleConfig, fit: StackedTable, test: StackedTable) -> str:
    """The key of a finished vote: every setting but the run section's (device, threads, force: none changes the
    result; the seeds in use are meta.seed), and the contents of both splits' tables."""
    settings = {k: v for k, v in to_dict(cfg).items() if k != "run"}
    return stage_key("ensemble", settings=settings, upstream=(table_digest(fit), table_digest(test)))


def finished_vote(out: Path, key: str) -> dict[str, Any] | None:
    """The summary of a vote already written into ``out`` for ``key`` with all its files, else None."""
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    # every file lies in ``out``: look there by name, so a vote rerun from another working directory is still found
    files = [out / Path(p).name for p in summary.get("paths", {}).values()]
    if summary.get("vote_key") != key or not all(f.is_file() for f in files):
        return None
    return summary


def run_vote(cfg: EnsembleConfig, run: Run) -> dict[str, Any]:
    """Fit the meta-network and the baselines on the held-out split, evaluate each once on the test split, write
    the comparison into ``run.dir`` and return a summary.

    Every choice (meta-network settings, logistic C, best single backbone, temperature, refer threshold) is made
    inside the fit split; the test tables are read up front only to check that they agree, and scored once after
    every choice is fixed. A vote already finished in ``run.dir`` on the same tables and settings is reused (its
    summary returned, nothing refitted) unless ``run.force``.
    """
    d = cfg.data
    fit_all = load_probability_tables(d.classification_root, d.backbones, d.fit_split)
    test_all = load_probability_tables(d.classification_root, d.backbones, d.test_split)
    check_fit_and_test_agree(fit_all, test_all)
    key = vote_key(cfg, fit_all, test_all)
    if not cfg.run.force and (done := finished_vote(run.dir, key)) is not None:
        logger.info("reused the finished vote in %s (same tables and settings; --force refits)", run.dir)
        return done
    fit = _fit_rows(fit_all)
    test = test_all.labelled()
    if len(test) == 0:
        raise TableError(f"the {d.test_split} tables hold no labelled image: nothing to evaluate the vote on")
    classes, backbones = fit.classes, fit.backbones
    refer_index = _refer_class_index(cfg, classes, fit.labels)

    # --- every choice, on the fit split only ---
    selection = select_meta_settings(fit.probs, fit.labels, cfg.meta, run.device)
    meta = fit_meta(fit.probs, fit.labels, cfg.meta, cfg.meta.seed, selection.settings, run.device)
    # the out-of-fold logits come from models that did not see those images, unlike the final model's own fit
    temperature = 1.0
    if cfg.calibration.temperature:
        temperature = fit_temperature(selection.oof_logits, fit.labels)
    oof_calibrated = apply_temperature(selection.oof_logits, temperature)
    threshold, referral_fit = 0.0, {}
    if refer_index is not None:
        threshold = refer_threshold(oof_calibrated, fit.labels, refer_index, cfg.calibration.target_sensitivity)
        referral_fit = referral_outcome(oof_calibrated, fit.labels, refer_index, threshold)
    best_index, single_scores = best_single(fit.probs, fit.labels, backbones)
    stacking = logistic_stacking(
        fit.probs,
        fit.labels,
        cfg.baselines.logistic_c_grid,
        cfg.baselines.logistic_inputs,
        cfg.meta.cv_folds,
        cfg.meta.seed,
    )

    # --- the test split, scored once ---
    test_logits = meta_logits(meta, test_all.probs)
    test_meta_raw = softmax(test_logits)
    test_meta = apply_temperature(test_logits, temperature)
    labelled = test_all.labels >= 0
    s = selection.settings
    methods: list[tuple[str, np.ndarray, str]] = [
        *((name, test.probs[:, b, :], "single backbone") for b, name in enumerate(backbones)),
        ("best_single", test.probs[:, best_index, :], f"{backbones[best_index]} (chosen on {d.fit_split})"),
        ("mean_vote", mean_vote(test.probs), ""),
        ("majority_vote", majority_vote(test.probs), "ties by mean probability"),
        ("logistic_stacking", stacking.predict_proba(test.probs), f"C={stacking.c:g} on {stacking.inputs}"),
        ("meta_network", test_meta_raw[labelled], f"hidden={s.hidden} weight_decay={s.weight_decay:g} on {s.inputs}"),
    ]
    if cfg.calibration.temperature:
        methods.append(("meta_network_calibrated", test_meta[labelled], f"temperature={temperature:.3f}"))
    n_bins = cfg.calibration.ece_bins
    rows = [{"method": m, **method_metrics(test.labels, p, classes, n_bins), "detail": det} for m, p, det in methods]
    if cfg.evaluation.bootstrap:
        intervals = bootstrap_balanced_accuracy(
            test.labels,
            {m: p.argmax(axis=1) for m, p, _ in methods},
            "best_single",
            cfg.evaluation.bootstrap,
            cfg.evaluation.confidence,
            cfg.meta.seed,
        )
        for row in rows:
            row.update(intervals[row["method"]])
    referral_test = {}
    if refer_index is not None:
        referral_test = referral_outcome(test_meta[labelled], test.labels, refer_index, threshold)

    # --- outputs ---
    out = run.dir
    paths = {
        "methods": write_methods_table(out / "methods.csv", rows, classes),
        "confusion": write_confusion_matrix(
            test.labels, test_meta[labelled].argmax(1), classes, out / "confusion_meta"
        ),
        "reliability": reliability_diagram(
            {"meta-network": test_meta_raw[labelled], "meta-network, temperature-scaled": test_meta[labelled]}
            if cfg.calibration.temperature
            else {"meta-network": test_meta_raw[labelled]},
            test.labels,
            out / "reliability_meta.png",
            n_bins,
            "Meta-network on the test split",
        ),
        "predictions": _write_predictions(out / "test_predictions.csv", test_all, test_meta, threshold),
    }
    paths["meta"] = save_meta(
        out / META_FILE,
        meta,
        classes,
        backbones,
        {
            "hidden": s.hidden,
            "weight_decay": s.weight_decay,
            "inputs": s.inputs,
            "fit_split": d.fit_split,
            "temperature": temperature,
            "refer": refer_index is not None,
            "refer_class": cfg.calibration.refer_class if refer_index is not None else "",
            "refer_threshold": threshold,
            "target_sensitivity": cfg.calibration.target_sensitivity,
            "tables": {b: src.get("table_key", "") for b, src in zip(backbones, fit.sources)},
            "weights_digests": {b: src.get("weights_digest", "") for b, src in zip(backbones, test.sources)},
            "config_hash": config_hash(cfg),
        },
    )
    summary = {
        "vote_key": key,
        "fit_split": d.fit_split,
        "n_fit": len(fit),
        "n_test": len(test),
        "n_test_unlabelled": len(test_all) - len(test),
        "backbones": list(backbones),
        "classes": list(classes),
        "meta_settings": {
            "hidden": s.hidden,
            "weight_decay": s.weight_decay,
            "inputs": s.inputs,
            "cv_folds": selection.folds,
        },
        "meta_cv": list(selection.scores),
        "logistic_c": stacking.c,
        "logistic_cv": list(stacking.cv_scores),
        "best_single": backbones[best_index],
        "single_fit_scores": list(single_scores),
        "temperature": temperature,
        "refer_threshold": threshold,
        "referral_fit": referral_fit,
        "referral_test": referral_test,
        "methods": rows,
        "paths": {k: str(v) for k, v in paths.items()},
    }
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2, default=float))
    logger.info("wrote %s", paths["methods"])
    return summary


def _write_predictions(path: Path, table: StackedTable, probs: np.ndarray, threshold: float) -> Path:
    """Every test image (labelled or not): calibrated meta-network probabilities, top class, and the refer flag."""
    header = ["image_id", "crop_key", "label", "predicted", "top_probability", "refer", *table.classes]
    rows = []
    for i, image_id in enumerate(table.ids):
        top = float(probs[i].max())
        label = table.classes[table.labels[i]] if table.labels[i] >= 0 else ""
        rows.append(
            [
                image_id,
                table.crop_keys[i],
                label,
                table.classes[int(probs[i].argmax())],
                f"{top:.6f}",
                int(top < threshold),
                *(f"{p:.6f}" for p in probs[i]),
            ]
        )
    return _write_csv(path, header, rows)
