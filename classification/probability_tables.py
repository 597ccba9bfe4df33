"""Probability tables: one backbone's class probabilities for one split, the ensemble's input.

A table's CSV holds ``image_id, crop_key, label`` and one column per class; its JSON sidecar says which backbone and
checkpoint made it, with which settings, and which images the model saw in training (``trained_on``), so the
ensemble can refuse a leaky or stale one. Every row comes through the per-crop probability cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dermpipe.classification.prediction import CropProbabilities
from dermpipe.data.loaders import ClassificationDataset
from dermpipe.data.manifest import ManifestError
from dermpipe.engine import csvsafe
from dermpipe.engine.cache import stage_key
from dermpipe.engine.files import atomic_path, write_text_atomic

logger = logging.getLogger(__name__)

SOURCES: tuple[str, ...] = ("val", "test", "oof", "train")
ID_COLUMNS: tuple[str, ...] = ("image_id", "crop_key", "label")
TABLE_INFO_KEYS: tuple[str, ...] = ("backbone", "source", "trained_on", "weights_digest", "settings")


def table_key(crop_keys: Sequence[str], weights_digest: str, settings: Mapping[str, Any]) -> str:
    """A table's identity: its sorted crop keys (order-free), the checkpoint digest and the prediction settings."""
    return stage_key("probability_table", inputs=sorted(crop_keys), settings=settings, model=weights_digest)


def write_probability_table(
    run_dir: str | os.PathLike,
    split: str,
    ids: Sequence[str],
    crop_keys: Sequence[str],
    labels: Sequence[str],
    probs: np.ndarray,
    classes: Sequence[str],
    meta: Mapping[str, Any],
) -> Path:
    """Write ``<run_dir>/probs_<split>.csv`` and its JSON sidecar (the sidecar last: finding it means the CSV is whole).

    CSV columns: ``image_id, crop_key, label`` (class name or empty), then one probability column per class in the
    model's order. ``meta`` needs ``backbone``, ``source`` (val/test/oof/train), ``trained_on`` (what the model saw),
    ``weights_digest`` and ``settings``; ``table_key`` may be given (else it is computed from these). The sidecar holds
    backbone, classes, split, source, trained_on, weights_digest and table_key (plus image count and settings).
    """
    missing = [k for k in TABLE_INFO_KEYS if k not in meta]
    if missing:
        raise ValueError(f"probability table meta lacks {', '.join(missing)}")
    if meta["source"] not in SOURCES:
        raise ValueError(f"probability table source {meta['source']!r} is not one of {list(SOURCES)}")
    clash = [c for c in classes if c in ID_COLUMNS]
    if clash:
        raise ManifestError(f"class name {clash[0]!r} clashes with a table column; rename the class in the manifest")
    probs = np.asarray(probs, dtype=np.float32)
    n = len(ids)
    if not (len(crop_keys) == len(labels) == n and probs.shape == (n, len(classes))):
        raise ValueError(
            f"table {split}: {n} ids, {len(crop_keys)} crop keys, {len(labels)} labels and probs of shape "
            f"{probs.shape} for {len(classes)} classes do not line up"
        )
    key = meta.get("table_key") or table_key(crop_keys, meta["weights_digest"], meta["settings"])
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    csv_path = run_dir / f"probs_{split}.csv"
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csvsafe.Writer(f)
        writer.writerow([*ID_COLUMNS, *classes])
        for image_id, crop_key, label, row in zip(ids, crop_keys, labels, probs.tolist()):
            writer.writerow([image_id, crop_key, label, *(f"{p:.8g}" for p in row)])
    info = {
        "backbone": meta["backbone"],
        "classes": list(classes),
        "split": split,
        "source": meta["source"],
        "trained_on": meta["trained_on"],
        "weights_digest": meta["weights_digest"],
        "table_key": key,
        "n_images": n,
        "settings": dict(meta["settings"]),
        **{k: v for k, v in meta.items() if k not in (*TABLE_INFO_KEYS, "table_key")},
    }
    # The sidecar lands last: a reader that finds it finds the matching CSV.
    write_text_atomic(csv_path.with_suffix(".json"), json.dumps(info, indent=1) + "\n")
    return csv_path


def read_probability_table(
    run_dir: str | os.PathLike, split: str
) -> tuple[list[str], list[str], list[str], np.ndarray, dict[str, Any]]:
    """``(ids, crop_keys, labels, probs, info)`` of ``<run_dir>/probs_<split>.csv`` and its sidecar."""
    csv_path = Path(run_dir) / f"probs_{split}.csv"
    side = csv_path.with_suffix(".json")
    if not csv_path.is_file() or not side.is_file():
        raise FileNotFoundError(f"probability table {csv_path} (or its .json) not found: train this backbone first")
    info = json.loads(side.read_text())
    ids, keys, labels, rows = [], [], [], []
    with open(csv_path, newline="") as f:
        reader = csvsafe.DictReader(f)
        for r in reader:
            ids.append(r["image_id"])
            keys.append(r["crop_key"])
            labels.append(r["label"])
            rows.append([float(r[c]) for c in info["classes"]])
    probs = np.asarray(rows, dtype=np.float32).reshape(len(rows), len(info["classes"]))
    return ids, keys, labels, probs, info


def probability_table(
    predictor: CropProbabilities,
    dataset: ClassificationDataset,
    *,
    run_dir: str | os.PathLike,
    split: str,
    ids: Sequence[str],
    crop_keys: Sequence[str],
    labels: Sequence[str],
    classes: Sequence[str],
    source: str,
    trained_on: str,
    settings: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, Path]:
    """The table of ``dataset``'s rows (per-crop cache hits reused, misses predicted from the run's resized images),
    written to ``<run_dir>/probs_<split>.csv``."""
    settings = {**predictor.settings, **(settings or {})}
    probs = predictor(crop_keys, lambda i: dataset.images.get(i)[0], preprocessed=True, desc=f"predict {split}")
    meta = {
        "backbone": predictor.model.backbone_name,
        "source": source,
        "trained_on": trained_on,
        "weights_digest": predictor.weights_digest,
        "settings": settings,
        "table_key": table_key(crop_keys, predictor.weights_digest, settings),
    }
    path = write_probability_table(run_dir, split, ids, crop_keys, labels, probs, classes, meta)
    return probs, path


def combined_digest(digests: Sequence[str]) -> str:
    """One digest standing for several checkpoints (the K fold models of a backbone)."""
    return hashlib.sha256("|".join(digests).encode()).hexdigest()
