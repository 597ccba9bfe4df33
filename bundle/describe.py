"""What bundle.json says about a bundle's files, recomputed from the files themselves: the weights' settings, the
metrics with the digests of the models they scored."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dermpipe.classification.ood import OOD_FILE, ood_description
from dermpipe.configs.schema import ROOT_LAYOUT
from dermpipe.engine.checkpoint import read_metadata

UNET = "segmentation/best.safetensors"


META = "ensemble/meta.safetensors"


# weights_source: where training started (which ImageNet weights, or from scratch), as the checkpoint recorded it
CLASSIFIER_KEYS = ("backbone", "input_size", "mean", "std", "se_reduction", "preprocess", "drop_rate", "fold_models",
                   "weights_source")  # fmt: skip


SEGMENTATION_KEYS = ("architecture", "encoder", "input_size", "decoder_channels", "preprocess", "mean", "std",
                     "weights_source")  # fmt: skip


CALIBRATION_KEYS = ("temperature", "refer", "refer_class", "refer_threshold", "target_sensitivity")


CLASSIFIER_SCORES = ("balanced_accuracy", "accuracy", "macro_f1", "macro_auc", "n_images")


# the methods of the vote's comparison scored by the learned vote itself (its weights and the backbones under it)
VOTE_METHODS = ("meta_network", "meta_network_calibrated")


# bundle.json's keys that describe the bundled files: recomputed from them at every load, a disagreement refused
DESCRIBED = ("classes", "backbones", "segmentation", "classifiers", "crops", "vote", "calibration", "metrics")


# every key bundle.json holds; the others describe the bundle (name: its identity) or what is not in it (the training
# manifest's counts, the library versions) and steer nothing
INFO_KEYS = ("format", "format_version", "name", "created", "source_root", *DESCRIBED, "training_data", "versions")


def classifier_weights(backbone: str) -> str:
    """A backbone's weights inside a bundle."""
    return f"{ROOT_LAYOUT['classification']}/{backbone}/best.safetensors"


def _segmentation_scores(path: Path | None) -> dict[str, Any] | None:
    """The U-Net's best epoch in its metrics.csv (by validation Jaccard, as the best checkpoint is chosen)."""
    if path is None or not path.is_file():
        return None
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_jaccard")]
    if not rows:
        return None
    best = max(rows, key=lambda r: _float(r["val_jaccard"]) or 0.0)
    return {"epoch": best.get("epoch"), "val_jaccard": _float(best["val_jaccard"]),
            "val_dice": _float(best.get("val_dice"))}  # fmt: skip


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _scores(files: Mapping[str, Path], backbones: Sequence[str]) -> dict[str, Any]:
    """The metric blocks of bundle.json (no digests yet): the U-Net's validation Jaccard, each backbone's test scores,
    the vote's test comparison, each from the metric file its stage wrote."""
    scores: dict[str, Any] = {}
    segmentation = _segmentation_scores(files.get("segmentation/metrics.csv"))
    if segmentation:
        scores["segmentation"] = segmentation
    classifiers = {}
    for backbone in backbones:
        report = _read_json(files.get(f"{ROOT_LAYOUT['classification']}/{backbone}/metrics_test.json"))
        if report:
            classifiers[backbone] = {k: report.get(k) for k in CLASSIFIER_SCORES}
    if classifiers:
        scores["classifiers"] = classifiers
    summary = _read_json(files.get("ensemble/summary.json"))
    if summary.get("methods"):
        scores["vote"] = {
            "n_test": summary.get("n_test"),
            "best_single": summary.get("best_single"),
            "methods": summary["methods"],
            "referral_test": summary.get("referral_test") or {},
            "target_sensitivity": summary.get("target_sensitivity"),
            "target_missed": summary.get("target_missed"),
        }
    return scores


def _described(files: Mapping[str, Path]) -> dict[str, Any]:
    """What bundle.json says about the bundled files, computed from them alone (the weights' own metadata and the
    metric files; metric digests apart): written at bundling, recomputed and compared at every load."""
    vote = read_metadata(files[META])
    seg_meta = read_metadata(files[UNET])
    backbones = list(vote["backbones"])
    classifiers = {}
    crops = None
    for backbone in backbones:
        meta = read_metadata(files[classifier_weights(backbone)])
        classifiers[backbone] = {k: meta.get(k) for k in CLASSIFIER_KEYS}
        ood = files.get(f"{ROOT_LAYOUT['classification']}/{backbone}/{OOD_FILE}")
        if ood:  # the out-of-distribution check's statistics (a bundle of older classifiers has none)
            classifiers[backbone]["ood"] = ood_description(ood, files[classifier_weights(backbone)])
        crops = crops or meta.get("crops")
    described = {
        "classes": list(vote["classes"]),
        "backbones": backbones,
        "segmentation": {k: seg_meta.get(k) for k in SEGMENTATION_KEYS},
        "classifiers": classifiers,
        "crops": crops,
        "vote": {k: vote.get(k) for k in ("init", "anchor", "hidden", "weight_decay", "inputs", "fit_split")},
        "calibration": {k: vote.get(k) for k in CALIBRATION_KEYS},
        "metrics": _scores(files, backbones),
    }
    return json.loads(json.dumps(described, default=str))  # as bundle.json holds it


def _with_digests(described: dict[str, Any], digests: Mapping[str, str]) -> dict[str, Any]:
    """``described`` with each metric block naming the sha256 of what it scored (``digests``: bundle path of each
    weights file -> sha256): ``model_digest`` of one model, ``model_digests`` (role -> sha256) of several."""
    backbones = described["backbones"]
    models = {b: digests[classifier_weights(b)] for b in backbones}
    scores = described["metrics"]
    if "segmentation" in scores:
        scores["segmentation"]["model_digest"] = digests[UNET]
    for backbone, block in (scores.get("classifiers") or {}).items():
        block["model_digest"] = models[backbone]
    if "vote" in scores:
        vote = scores["vote"]
        vote["model_digests"] = {"meta": digests[META], **models}
        for row in vote["methods"]:
            method = row.get("method")
            if method in VOTE_METHODS:
                row["model_digests"] = vote["model_digests"]
            elif method in models or method == "best_single" and vote.get("best_single") in models:
                single = method if method in models else vote["best_single"]
                row["model_digests"] = {single: models[single]}
            else:  # a baseline vote over the backbones (its own fitted weights, if any, are not bundled)
                row["model_digests"] = models
    described["calibration"]["model_digest"] = digests[META]
    return described


def _read_json(path: Path | None) -> dict[str, Any]:
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def _read_metrics(seg_dir: Path) -> list[dict[str, str]]:
    if not (seg_dir / "metrics.csv").is_file():
        return []
    with open(seg_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))
