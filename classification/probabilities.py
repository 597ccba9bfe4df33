"""Class probabilities per image (optionally with flip/rotation TTA), cached per table and exported for the ensemble.

A table is one backbone's probabilities for one split. Its cache key covers the sorted crop keys (image bytes,
segmentation weights and crop settings upstream), the digest of the checkpoint file and the prediction settings, so
a changed crop or checkpoint misses and the ensemble never stacks a stale table. The JSON sidecar says which images
the model saw in training (``trained_on``), so the ensemble can refuse a leaky one.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dermpipe.classification.backbones import LesionClassifier
from dermpipe.data.datasets import resize_square
from dermpipe.data.manifest import ManifestError
from dermpipe.data.preprocess import PreprocessConfig, preprocess
from dermpipe.engine.cache import StageCache, stage_key

logger = logging.getLogger(__name__)

STAGE = "probabilities"
SOURCES: tuple[str, ...] = ("val", "test", "oof", "train")
ID_COLUMNS: tuple[str, ...] = ("image_id", "crop_key", "label")
TABLE_INFO_KEYS: tuple[str, ...] = ("backbone", "source", "trained_on", "weights_digest", "settings")


def dihedral_views(images: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/rotations of a B x C x H x W batch (a lesion has no "up", so all 8 are equally valid views)."""
    views = []
    for flipped in (images, images.flip(-1)):
        views.extend(torch.rot90(flipped, k, dims=(-2, -1)) for k in range(4))
    return views


def _array_batches(
    images: Sequence[np.ndarray],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    preprocess_cfg: PreprocessConfig | None,
) -> Any:
    mean_arr = np.asarray(mean, dtype=np.float32) * 255.0
    std_arr = np.asarray(std, dtype=np.float32) * 255.0
    for start in range(0, len(images), batch_size):
        batch = []
        for image in images[start : start + batch_size]:
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"expected HxWx3 uint8 RGB images, got shape {image.shape} and dtype {image.dtype}")
            if preprocess_cfg is not None:
                image = preprocess(image, preprocess_cfg)
            batch.append((resize_square(image, size).astype(np.float32) - mean_arr) / std_arr)
        yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()


def images_to_batches(
    model: LesionClassifier,
    images: Sequence[np.ndarray],
    batch_size: int = 32,
    preprocess_cfg: PreprocessConfig | None = None,
) -> Any:
    """Normalised input batches (B x 3 x S x S float) for uint8 RGB images of any size, as the model was trained."""
    cfg = model.data_config
    return _array_batches(images, model.input_size, cfg["mean"], cfg["std"], batch_size, preprocess_cfg)


@torch.inference_mode()
def predict_probabilities(
    model: LesionClassifier,
    images: Dataset | Sequence[np.ndarray],
    tta: bool = False,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    amp: bool = False,
    channels_last: bool = False,
    num_workers: int = 0,
    preprocess_cfg: PreprocessConfig | None = None,
    desc: str = "predict",
) -> np.ndarray:
    """Softmax probabilities (N x C float32, rows sum to 1) in the order of ``images``.

    ``images`` is a dataset of ``(normalised tensor, label)`` items (e.g. ``ClassificationDataset`` with the eval
    transform) or a sequence of uint8 RGB arrays (resized and normalised here; ``preprocess_cfg`` as in training).
    ``tta`` averages the probabilities of the 8 flips/rotations of each image.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    if isinstance(images, Dataset):
        loader: Any = (
            batch[0] for batch in DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        )
    else:
        loader = images_to_batches(model, list(images), batch_size, preprocess_cfg)
    chunks = []
    total = len(images)  # type: ignore[arg-type]
    with tqdm(total=total, desc=desc, leave=False, disable=None) as bar:
        for batch in loader:
            batch = batch.to(device, non_blocking=True)
            if channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            views = dihedral_views(batch) if tta else [batch]
            probs = torch.zeros(batch.shape[0], model.num_classes, device=device)
            for view in views:
                with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                    logits = model(view)
                probs += torch.softmax(logits.float(), dim=1)
            chunks.append((probs / len(views)).cpu().numpy())
            bar.update(batch.shape[0])
    if not chunks:
        return np.zeros((0, model.num_classes), dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32)


def prediction_settings(
    model: LesionClassifier, tta: bool, preprocess_cfg: PreprocessConfig | None, image_column: str
) -> dict[str, Any]:
    """The settings besides the weights that change a table: input size, normalisation, TTA, preprocessing."""
    return {
        "backbone": model.backbone_name,
        "input_size": int(model.input_size),
        "mean": list(model.data_config["mean"]),
        "std": list(model.data_config["std"]),
        "tta": bool(tta),
        "preprocess": asdict(preprocess_cfg or PreprocessConfig()),
        "image_column": image_column,
    }


def table_key(crop_keys: Sequence[str], weights_digest: str, settings: Mapping[str, Any]) -> str:
    """The cache key of a table: sorted crop keys (order-free), checkpoint digest and prediction settings."""
    return stage_key(STAGE, inputs=sorted(crop_keys), settings=settings, model=weights_digest)


def cached_probabilities(cache: StageCache, key: str, crop_keys: Sequence[str]) -> np.ndarray | None:
    """The cached table under ``key`` in the order of ``crop_keys``, or ``None`` (a miss or a table that lacks one)."""
    hit = cache.get(key)
    if hit is None:
        return None
    arrays, _ = hit
    row_of = {str(k): i for i, k in enumerate(arrays["crop_keys"].tolist())}
    if any(k not in row_of for k in crop_keys):
        return None
    return arrays["probs"][[row_of[k] for k in crop_keys]].astype(np.float32)


def write_probability_table(
    run_dir: str | os.PathLike,
    cache: StageCache,
    split: str,
    ids: Sequence[str],
    crop_keys: Sequence[str],
    labels: Sequence[str],
    probs: np.ndarray,
    classes: Sequence[str],
    meta: Mapping[str, Any],
) -> Path:
    """Store a table in the stage cache and export ``<run_dir>/probs_<split>.csv`` plus its JSON sidecar.

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
    if cache.force or not cache.path(key).is_file():
        order = np.argsort(np.asarray(crop_keys, dtype=str), kind="stable")
        arrays = {"probs": probs[order], "crop_keys": np.asarray(crop_keys, dtype=str)[order]}
        cache.put(key, arrays, {"backbone": meta["backbone"], "classes": list(classes), "split": split})
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    csv_path = run_dir / f"probs_{split}.csv"
    tmp = csv_path.with_name(f".{csv_path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
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
    side = csv_path.with_suffix(".json")
    side_tmp = side.with_name(f".{side.name}.{os.getpid()}.tmp")
    side_tmp.write_text(json.dumps(info, indent=1) + "\n")
    # The sidecar lands last: a reader that finds it finds the matching CSV.
    os.replace(tmp, csv_path)
    os.replace(side_tmp, side)
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
        reader = csv.DictReader(f)
        for r in reader:
            ids.append(r["image_id"])
            keys.append(r["crop_key"])
            labels.append(r["label"])
            rows.append([float(r[c]) for c in info["classes"]])
    probs = np.asarray(rows, dtype=np.float32).reshape(len(rows), len(info["classes"]))
    return ids, keys, labels, probs, info


def probability_table(
    model: LesionClassifier,
    dataset: Dataset,
    *,
    run_dir: str | os.PathLike,
    cache: StageCache,
    split: str,
    ids: Sequence[str],
    crop_keys: Sequence[str],
    labels: Sequence[str],
    classes: Sequence[str],
    weights_digest: str,
    settings: Mapping[str, Any],
    source: str,
    trained_on: str,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    amp: bool = False,
    channels_last: bool = False,
    num_workers: int = 0,
) -> tuple[np.ndarray, Path]:
    """The table of ``dataset`` from the cache when its key matches, else predicted and stored; always exported."""
    key = table_key(crop_keys, weights_digest, settings)
    probs = cached_probabilities(cache, key, crop_keys)
    if probs is None:
        probs = predict_probabilities(
            model,
            dataset,
            bool(settings.get("tta")),
            batch_size,
            device,
            amp,
            channels_last,
            num_workers,
            desc=f"predict {split}",
        )
    meta = {
        "backbone": model.backbone_name,
        "source": source,
        "trained_on": trained_on,
        "weights_digest": weights_digest,
        "settings": settings,
        "table_key": key,
    }
    path = write_probability_table(run_dir, cache, split, ids, crop_keys, labels, probs, classes, meta)
    return probs, path


def combined_digest(digests: Sequence[str]) -> str:
    """One digest standing for several checkpoints (the K fold models of a backbone)."""
    return hashlib.sha256("|".join(digests).encode()).hexdigest()
