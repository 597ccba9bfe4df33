"""PyTorch datasets for segmentation (image, mask) and classification (image, label), read through the stage cache.

Each image is decoded, preprocessed and resized once per size (a cache entry keyed by its bytes and the settings), not
once per epoch; random augmentation runs on the cached, resized arrays.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from dermpipe.data.manifest import Manifest, ManifestError
from dermpipe.data.preprocess import PreprocessConfig, preprocess
from dermpipe.data.reading import image_size, read_image, read_mask
from dermpipe.engine.cache import StageCache, stage_key
from dermpipe.engine.files import file_digest
from dermpipe.engine.loop import epoch_seed

logger = logging.getLogger(__name__)

# Keep resized arrays in memory when they fit in this budget; else read each from its cache entry per item.
IN_MEMORY_BYTES = 2 << 30


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with_parent(worker_id: int = 0) -> None:  # pragma: no cover - runs in DataLoader worker processes
    """``worker_init_fn`` of every DataLoader: the worker is killed with its parent (on Linux, the kernel sends it
    SIGKILL when the parent dies, by SIGKILL or SIGTERM too), and one whose parent died before this ran exits now.

    Without it a worker busy decoding outlives a killed parent, holding its memory, until it next waits for work.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the parent is gone: adopted by init or a subreaper
        os._exit(1)


def seed_worker(worker_id: int) -> None:  # pragma: no cover - runs in DataLoader worker processes
    """``worker_init_fn`` of the training loaders: ``end_with_parent``, and each worker its own augmentation stream
    (albumentations does not reseed in forked workers)."""
    end_with_parent(worker_id)
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info is not None else None
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(torch.initial_seed() % 2**32)


def seed_epoch(loader: torch.utils.data.DataLoader, seed: int, epoch: int) -> None:
    """Reseed torch, the loader's shuffling and its dataset's augmentation for one epoch.

    Every epoch draws from its own seed, so a run resumed at epoch ``e`` sees the same batches, augmentations and
    dropout as an uninterrupted run (albumentations' Compose keeps a generator of its own, unseeded by torch).
    """
    value = epoch_seed(seed, epoch)
    torch.manual_seed(value)
    if loader.generator is not None:
        loader.generator.manual_seed(value)
    transform = getattr(loader.dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(value % 2**32)


def resize_square(image: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """Resize to ``size`` x ``size`` (the aspect ratio is not kept, as the ISIC challenge pipelines do)."""
    if image.shape[:2] == (size, size):
        return image
    interp = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_LINEAR)
    return cv2.resize(image, (size, size), interpolation=interp)


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on ``device``: to a GPU through pinned memory and a non-blocking copy (the copy overlaps the work
    already queued there); elsewhere a plain copy."""
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def model_input(
    images: Sequence[np.ndarray],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    preprocess_cfg: PreprocessConfig | None = None,
) -> torch.Tensor:
    """uint8 RGB images of any size -> one normalised B x 3 x size x size float32 tensor, as a network takes it.

    The one path from pixels to a network's input outside training (where albumentations normalises): preprocessing
    (as in training), the square resize, then ``(x - 255 mean) / (255 std)`` per channel.
    """
    mean_arr = np.asarray(mean, dtype=np.float32) * 255.0
    std_arr = np.asarray(std, dtype=np.float32) * 255.0
    batch = []
    for image in images:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected HxWx3 uint8 RGB images, got shape {image.shape} and dtype {image.dtype}")
        if preprocess_cfg is not None:
            image = preprocess(image, preprocess_cfg)
        batch.append((resize_square(image, size).astype(np.float32) - mean_arr) / std_arr)
    return torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()


def decode_size(size: int) -> int:
    """The longest side to decode at: large images are reduced early, but never below what resizing needs."""
    return max(1024, 2 * size)


class ResizedImages:
    """Images (and optionally masks) decoded, preprocessed and resized once, through the stage cache."""

    def __init__(
        self,
        image_paths: Sequence[str],
        size: int,
        cache_root: str | Path,
        preprocess_cfg: PreprocessConfig | None = None,
        mask_paths: Sequence[str] | None = None,
        force: bool = False,
        desc: str = "resize",
    ) -> None:
        self.size = size
        self.preprocess_cfg = preprocess_cfg or PreprocessConfig()
        self.cache = StageCache(cache_root, "resized", force=force)
        self.image_paths = list(image_paths)
        self.mask_paths = list(mask_paths) if mask_paths is not None else None
        settings = {"size": size, "preprocess": asdict(self.preprocess_cfg), "decode": decode_size(size)}
        self.keys: list[str] = []
        images: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        budget = IN_MEMORY_BYTES
        for i, path in enumerate(tqdm(self.image_paths, desc=desc, leave=False, disable=len(self.image_paths) < 200)):
            mask_path = self.mask_paths[i] if self.mask_paths is not None else ""
            inputs = [file_digest(path)] + ([file_digest(mask_path)] if mask_path else [])
            key = stage_key("resized", inputs=inputs, settings=settings)
            self.keys.append(key)
            arrays, _ = self.cache.get_or_compute(key, lambda p=path, m=mask_path: self._compute(p, m))
            budget -= sum(a.nbytes for a in arrays.values())
            if budget > 0:
                images.append(arrays["image"])
                if "mask" in arrays:
                    masks.append(arrays["mask"])
        self._images = images if budget > 0 else None
        self._masks = masks if budget > 0 and masks else None
        self.cache.log_summary()

    def _compute(self, path: str, mask_path: str) -> dict[str, np.ndarray]:
        image = read_image(path, max_side=decode_size(self.size))
        out = {"image": resize_square(preprocess(image, self.preprocess_cfg), self.size)}
        if mask_path:
            mask = read_mask(mask_path, size=image_size(path))  # refuses a mask that does not fit its image
            out["mask"] = resize_square(mask, self.size, nearest=True)
        return out

    def __len__(self) -> int:
        return len(self.image_paths)

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        if self._images is not None:
            return self._images[index], (self._masks[index] if self._masks is not None else None)
        hit = self.cache.get(self.keys[index])
        if hit is None:  # deleted or damaged since warm-up: recompute
            mask_path = self.mask_paths[index] if self.mask_paths is not None else ""
            arrays = self._compute(self.image_paths[index], mask_path)
            self.cache.put(self.keys[index], arrays)
        else:
            arrays = hit[0]
        return arrays["image"], arrays.get("mask")


class SegmentationDataset(Dataset):
    """(image tensor 3xHxW, mask tensor 1xHxW float {0,1}) pairs; image and mask go through one transform call."""

    def __init__(
        self,
        manifest: Manifest,
        size: int,
        cache_root: str | Path,
        transform: Callable[..., Any],
        preprocess_cfg: PreprocessConfig | None = None,
        force: bool = False,
    ) -> None:
        missing = [r["image_id"] for r in manifest.rows if not r.get("mask_path")]
        if missing:
            raise ManifestError(
                f"{len(missing)} images have no mask_path (first: {missing[0]}); segmentation needs masks: "
                "select rows with masks or add them to the manifest"
            )
        self.ids = [r["image_id"] for r in manifest.rows]
        self.images = ResizedImages(
            [r["image_path"] for r in manifest.rows],
            size,
            cache_root,
            preprocess_cfg,
            [r["mask_path"] for r in manifest.rows],
            force=force,
            desc="masks",
        )
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.images.get(index)
        out = self.transform(image=image, mask=mask)
        mask_t = torch.as_tensor(out["mask"]).float()
        return out["image"], mask_t.unsqueeze(0) if mask_t.ndim == 2 else mask_t


class ClassificationDataset(Dataset):
    """(image tensor, class index) pairs from a manifest; ``image_column`` picks crops (``crop_path``) or images."""

    def __init__(
        self,
        manifest: Manifest,
        size: int,
        cache_root: str | Path,
        transform: Callable[..., Any],
        preprocess_cfg: PreprocessConfig | None = None,
        image_column: str = "image_path",
        force: bool = False,
    ) -> None:
        paths = []
        for r in manifest.rows:
            if not r.get(image_column):
                raise ManifestError(
                    f"image {r['image_id']} has no {image_column}: run `python segmentation/predict.py` for crops "
                    "or train with --no-crop"
                )
            paths.append(r[image_column])
        self.ids = [r["image_id"] for r in manifest.rows]
        self.labels = np.array(manifest.label_indices(), dtype=np.int64)
        self.images = ResizedImages(paths, size, cache_root, preprocess_cfg, force=force, desc="images")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, _ = self.images.get(index)
        return self.transform(image=image)["image"], int(self.labels[index])
