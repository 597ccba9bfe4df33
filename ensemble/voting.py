"""The stacking run: fit the vote and every choice on held-out probabilities, score each method once on test."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dermpipe.configs.loader import config_hash, to_dict
from dermpipe.engine.cache import stage_key
from dermpipe.engine.files import write_text_atomic
from dermpipe.engine.lineage import file_sha256, write_lineage
from dermpipe.engine.rerun import Conflict, conflict, flatten, refuse_or_replace
from dermpipe.engine.run import Run
from dermpipe.ensemble.baselines import best_single, logistic_stacking, majority_vote, mean_vote
from dermpipe.ensemble.calibration import (
    apply_temperature,
    fit_temperature,
    never_refers,
    refer_threshold,
    referral_outcome,
    reliability_diagram,
)
from dermpipe.ensemble.config import EnsembleConfig
from dermpipe.ensemble.evaluation import bootstrap_balanced_accuracy, method_metrics
from dermpipe.ensemble.meta import fit_meta, meta_logits, save_meta, select_meta_settings, softmax
from dermpipe.ensemble.outputs import write_confusion_matrix, write_methods_plot, write_methods_table, write_predictions
from dermpipe.ensemble.stacked_tables import StackedTable, TableError, check_fit_and_test_agree, load_probability_tables

logger = logging.getLogger(__name__)

META_FILE = "meta.safetensors"


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


def vote_settings(cfg: EnsembleConfig, fit: StackedTable, test: StackedTable) -> dict[str, Any]:
    """What ``vote_key`` stands for, as dotted keys: every setting but the run section's, and each split's table
    digest. A finished vote records them, so a rerun with others names what differs."""
    settings = json.loads(json.dumps(flatten({k: v for k, v in to_dict(cfg).items() if k != "run"}), default=str))
    settings.update({f"tables.{t.split} digest": table_digest(t) for t in (fit, test)})
    return settings


def vote_conflict(out: Path, key: str, settings: dict[str, Any]) -> Conflict | None:
    """The vote ``out`` holds when it was made with other settings or tables (``None``: none there, or this one)."""
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("vote_key") == key:
        return None
    return conflict(out, "vote", True, summary.get("settings"), settings)


def write_vote_lineage(cfg: EnsembleConfig, out: Path) -> None:
    """``out/lineage.json``: each backbone's fit and test tables and weights, and the meta-network it made."""
    d = cfg.data
    consumed = {}
    for backbone in d.backbones:
        folder = Path(d.classification_root) / backbone
        for split in (d.fit_split, d.test_split):
            consumed[f"tables:{backbone}:{split}"] = file_sha256(folder / f"probs_{split}.csv")
        if (folder / "best.safetensors").is_file():  # tables alone (made elsewhere) name no weights here
            consumed[f"model:{backbone}"] = file_sha256(folder / "best.safetensors")
    write_lineage(out, "vote", consumed, {"meta": file_sha256(out / META_FILE)})


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


COMPARED = ("best_single", "mean_vote", "majority_vote", "logistic_stacking")


def meta_network_differences(
    labels: np.ndarray, predictions: dict[str, np.ndarray], samples: int, confidence: float, seed: int
) -> dict[str, dict[str, float]]:
    """The meta-network's balanced accuracy minus each of ``COMPARED``'s on the same test images: point difference,
    paired class-stratified bootstrap interval and the share of resamples where the meta-network scored higher (the
    same resamples for every comparison: they depend on the labels and the seed only, so each pair alone is
    resampled, not every method)."""
    out = {}
    for reference in COMPARED:
        pair = {"meta_network": predictions["meta_network"], reference: predictions[reference]}
        row = bootstrap_balanced_accuracy(labels, pair, reference, samples, confidence, seed)["meta_network"]
        out[reference] = {"difference": row["delta_vs_best_single"], "low": row["delta_low"],
                          "high": row["delta_high"], "p_better": row["p_better_than_best_single"]}  # fmt: skip
    return out


@dataclass
class _Choices:
    """Everything the vote chooses, on the fit split only."""

    selection: Any  # the meta-network settings chosen by cross-validation, with their out-of-fold logits
    meta: Any  # the meta-network fitted on the whole fit split
    temperature: float
    threshold: float
    referral_fit: dict[str, Any]
    never: str  # why the refer threshold can never refer on confidence ("" when it can)
    best_index: int
    single_scores: Any
    stacking: Any


def _choose(cfg: EnsembleConfig, fit: StackedTable, refer_index: int | None, device: Any) -> _Choices:
    """Every choice, on the fit split only: the meta-network's settings and weights, the temperature (on the
    out-of-fold logits: models that did not see those images), the refer threshold, the best single backbone and the
    logistic stacking's C."""
    selection = select_meta_settings(fit.probs, fit.labels, cfg.meta, device)
    meta = fit_meta(fit.probs, fit.labels, cfg.meta, cfg.meta.seed, selection.settings, device)
    temperature = fit_temperature(selection.oof_logits, fit.labels) if cfg.calibration.temperature else 1.0
    oof_calibrated = apply_temperature(selection.oof_logits, temperature)
    threshold, referral_fit, never = 0.0, {}, ""
    if refer_index is not None:
        threshold = refer_threshold(oof_calibrated, fit.labels, refer_index, cfg.calibration.target_sensitivity)
        referral_fit = referral_outcome(oof_calibrated, fit.labels, refer_index, threshold)
        # a refer rule that can never refer on confidence is said, at vote time, in summary.json and the card
        never = never_refers(threshold, len(fit.classes), temperature, oof_calibrated.max(axis=1))
    if never:
        logger.warning("calibration: %s", never)
    best_index, single_scores = best_single(fit.probs, fit.labels, fit.backbones)
    stacking = logistic_stacking(fit.probs, fit.labels, cfg.baselines.logistic_c_grid, cfg.baselines.logistic_inputs,
                                 cfg.meta.cv_folds, cfg.meta.seed)  # fmt: skip
    return _Choices(selection, meta, temperature, threshold, referral_fit, never, best_index, single_scores, stacking)


@dataclass
class _TestScores:
    """The test split, scored once every choice is fixed."""

    rows: list[dict[str, Any]]  # one per method: its metrics (and interval) on the labelled test images
    comparisons: dict[str, dict[str, float]]  # the meta-network's paired difference to each method
    referral_test: dict[str, Any]
    meta_raw: np.ndarray  # the meta-network's probabilities on every test image, before the temperature
    meta: np.ndarray  # ... and after it
    labelled: np.ndarray  # which test images carry a label


def _score_test(cfg: EnsembleConfig, c: _Choices, test_all: StackedTable, refer_index: int | None) -> _TestScores:
    test, classes, backbones, b = test_all.labelled(), test_all.classes, test_all.backbones, c.best_index
    logits = meta_logits(c.meta, test_all.probs)
    meta_raw, meta = softmax(logits), apply_temperature(logits, c.temperature)
    labelled = test_all.labels >= 0
    methods: list[tuple[str, np.ndarray, str]] = [
        *((name, test.probs[:, i, :], "single backbone") for i, name in enumerate(backbones)),
        ("best_single", test.probs[:, b, :], f"{backbones[b]} (chosen on {cfg.data.fit_split})"),
        ("mean_vote", mean_vote(test.probs), ""),
        ("majority_vote", majority_vote(test.probs), "ties by mean probability"),
        ("logistic_stacking", c.stacking.predict_proba(test.probs), f"C={c.stacking.c:g} on {c.stacking.inputs}"),
        ("meta_network", meta_raw[labelled], c.selection.settings.describe()),
    ]
    if cfg.calibration.temperature:
        methods.append(("meta_network_calibrated", meta[labelled], f"temperature={c.temperature:.3f}"))
    n_bins = cfg.calibration.ece_bins
    rows = [{"method": m, **method_metrics(test.labels, p, classes, n_bins), "detail": det} for m, p, det in methods]
    comparisons: dict[str, dict[str, float]] = {}
    if cfg.evaluation.bootstrap:
        e, predicted = cfg.evaluation, {m: p.argmax(axis=1) for m, p, _ in methods}
        intervals = bootstrap_balanced_accuracy(test.labels, predicted, "best_single", e.bootstrap, e.confidence,
                                                cfg.meta.seed)  # fmt: skip
        for row in rows:
            row.update(intervals[row["method"]])
        comparisons = meta_network_differences(test.labels, predicted, e.bootstrap, e.confidence, cfg.meta.seed)
    referral_test = {}
    if refer_index is not None:
        referral_test = referral_outcome(meta[labelled], test.labels, refer_index, c.threshold)
    return _TestScores(rows, comparisons, referral_test, meta_raw, meta, labelled)


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
    key, settings = vote_key(cfg, fit_all, test_all), vote_settings(cfg, fit_all, test_all)
    note = refuse_or_replace(vote_conflict(run.dir, key, settings), cfg.run.force)  # before anything is written
    if not cfg.run.force and (done := finished_vote(run.dir, key)) is not None:
        logger.info("reused the finished vote in %s (same tables and settings; --force refits)", run.dir)
        write_vote_lineage(cfg, run.dir)
        return done
    fit = _fit_rows(fit_all)
    if len(test_all.labelled()) == 0:
        raise TableError(f"the {d.test_split} tables hold no labelled image: nothing to evaluate the vote on")
    refer_index = _refer_class_index(cfg, fit.classes, fit.labels)
    choices = _choose(cfg, fit, refer_index, run.device)
    scores = _score_test(cfg, choices, test_all, refer_index)
    run.begin()  # everything fitted and scored: from here on the run folder is written
    if note:
        logger.warning("%s", note)
    summary = _write_vote(cfg, run.dir, fit, test_all, choices, scores, refer_index)
    summary = {"vote_key": key, "settings": settings, **summary}
    write_text_atomic(run.dir / "summary.json", json.dumps(summary, indent=2, default=float))
    write_vote_lineage(cfg, run.dir)
    logger.info("wrote %s", summary["paths"]["methods"])
    return summary


def _write_vote(
    cfg: EnsembleConfig,
    out: Path,
    fit: StackedTable,
    test_all: StackedTable,
    c: _Choices,
    t: _TestScores,
    refer_index: int | None,
) -> dict[str, Any]:
    """The run folder's pictures, tables and the vote's weights; the summary (without its key and settings)."""
    d, classes, backbones = cfg.data, fit.classes, fit.backbones
    test, labelled, s = test_all.labelled(), t.labelled, c.selection.settings
    reliability = {"meta-network": t.meta_raw[labelled]}
    if cfg.calibration.temperature:
        reliability["meta-network, temperature-scaled"] = t.meta[labelled]
    interval = cfg.evaluation.confidence if cfg.evaluation.bootstrap else None
    paths = {
        "methods": write_methods_table(out / "methods.csv", t.rows, classes),
        "methods_plot": write_methods_plot(out / "methods.png", t.rows, backbones[c.best_index], interval),
        "confusion": write_confusion_matrix(
            test.labels, t.meta[labelled].argmax(1), classes, out / "confusion_meta", "meta-network, test split"
        ),
        "reliability": reliability_diagram(
            reliability,
            test.labels,
            out / "reliability_meta.png",
            cfg.calibration.ece_bins,
            "Meta-network on the test split",
        ),  # fmt: skip
        "predictions": write_predictions(out / "test_predictions.csv", test_all, t.meta, c.threshold),
    }
    refer = refer_index is not None
    paths["meta"] = save_meta(out / META_FILE, c.meta, classes, backbones, {
        **s.record(),
        "fit_split": d.fit_split,
        "temperature": c.temperature,
        "refer": refer,
        "refer_class": cfg.calibration.refer_class if refer else "",
        "refer_threshold": c.threshold,
        "target_sensitivity": cfg.calibration.target_sensitivity,
        "tables": {b: src.get("table_key", "") for b, src in zip(backbones, fit.sources)},
        "weights_digests": {b: src.get("weights_digest", "") for b, src in zip(backbones, test.sources)},
        "config_hash": config_hash(cfg),
    })  # fmt: skip
    target = cfg.calibration.target_sensitivity
    return {
        "fit_split": d.fit_split,
        "n_fit": len(fit),
        "n_test": len(test),
        "n_test_unlabelled": len(test_all) - len(test),
        "backbones": list(backbones),
        "classes": list(classes),
        "meta_settings": {**s.record(), "cv_folds": c.selection.folds},
        "meta_cv": list(c.selection.scores),
        "logistic_c": c.stacking.c,
        "logistic_cv": list(c.stacking.cv_scores),
        "best_single": backbones[c.best_index],
        "single_fit_scores": list(c.single_scores),
        "temperature": c.temperature,
        "refer_threshold": c.threshold,
        "referral_fit": c.referral_fit,
        "referral_test": t.referral_test,
        "never_refers": c.never,  # why the refer threshold never refers on confidence ("" when it can)
        # the sensitivity the refer threshold was set for, and whether the test split reached it (flagged, not hidden)
        "target_sensitivity": target if t.referral_test else None,
        "target_missed": bool(t.referral_test and t.referral_test["sensitivity_with_referral"] < target),
        "methods": t.rows,
        "meta_network_vs": t.comparisons,
        "paths": {k: str(v) for k, v in paths.items()},
    }
