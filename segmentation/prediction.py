"""Lesion masks, boxes and square crops for any list of images, batched, with flip TTA, through the stage cache."""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dermpipe.data.loaders import decode_size, end_with_parent, model_input, resize_square, to_device
from dermpipe.data.manifest import write_table
from dermpipe.data.preprocess import PreprocessConfig, preprocess
from dermpipe.data.quality import DEFAULT_QUALITY, QUALITY_NO_LESION, assess_quality
from dermpipe.data.reading import ImageReadError, image_size, read_image
from dermpipe.engine.cache import StageCache, stage_key
from dermpipe.engine.checkpoint import check_trained_setting, weights_digest
from dermpipe.engine.files import FileInputError, file_digest
from dermpipe.engine.onnx_runtime import engine_model
from dermpipe.segmentation.config import SegmentationConfig, SegPredictConfig
from dermpipe.segmentation.lesion import FALLBACK_NO_LESION, LesionBox, clean_mask, crop_to_lesion, lesion_box
from dermpipe.segmentation.model import load_unet

logger = logging.getLogger(__name__)
T = TypeVar("T")
# An image waiting for the network: id, path, cache key, preprocessed pixels, original (height, width), quality, the
# photo's thumbnail.
Pending = tuple[str, str, str, np.ndarray, tuple[int, int], list[str], np.ndarray]
# The prediction settings that decide what a crop looks like: the classifiers must predict on crops made alike.
CROP_SETTINGS = ("threshold", "tta", "tta_rotations", "margin", "crop_size", "min_area")
THUMBNAIL_SIDE = 160  # the longer side of the photo's thumbnail kept with each crop (the report shows it)


def photo_thumbnail(image: np.ndarray) -> np.ndarray:
    """The photo as decoded for cropping, reduced (area) so its longer side is ``THUMBNAIL_SIDE``: what the report
    shows, kept with the crop so a report never decodes the source image a second time."""
    h, w = image.shape[:2]
    scale = THUMBNAIL_SIDE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.ascontiguousarray(cv2.resize(image, size, interpolation=cv2.INTER_AREA))


def full_probability(probability: np.ndarray, height: int, width: int) -> np.ndarray:
    """A stored low-resolution probability (uint8, x 255) resized bilinearly to the original image size."""
    return cv2.resize(probability, (width, height), interpolation=cv2.INTER_LINEAR)


@dataclass(frozen=True)
class CropResult:
    """One image's lesion: the square crop, its cache key, the box in original pixels and the low-res probability."""

    image_id: str
    path: str
    crop: np.ndarray  # crop_size x crop_size x 3 uint8
    crop_key: str
    box: LesionBox
    probability: np.ndarray  # image_size x image_size uint8 (lesion probability x 255)
    height: int
    width: int
    quality: tuple[str, ...] = ()  # why the models may not judge this image well (data/quality.py); empty: fine
    thumbnail: np.ndarray | None = None  # ``photo_thumbnail``; None from a cache entry made before it was kept

    def photo(self) -> np.ndarray:
        """The photo's thumbnail: the one kept with the crop, else decoded again exactly as the crop's was."""
        if self.thumbnail is not None:
            return self.thumbnail
        return photo_thumbnail(read_image(self.path, max_side=decode_size(len(self.crop))))

    def full_mask(self, threshold: float = 0.5) -> np.ndarray:
        """The cleaned lesion mask at the original image size (0/1 uint8)."""
        return clean_mask(full_probability(self.probability, self.height, self.width) > threshold * 255)


@dataclass(frozen=True)
class Skipped:
    """An input that was not predicted, with the reason (a row of ``skipped.csv``)."""

    image_id: str
    path: str
    reason: str


class SkipLog:
    """The inputs a folder run skipped: logged as they come, then written once as ``skipped.csv``."""

    COLUMNS = ("image_id", "path", "reason")

    def __init__(self, excluded: Iterable[Mapping[str, str]] = ()) -> None:
        self.rows: list[dict[str, str]] = [{k: row[k] for k in self.COLUMNS} for row in excluded]

    def __len__(self) -> int:
        return len(self.rows)

    def passed(self, results: Iterable[T | Skipped]) -> Iterator[T]:
        """The results that are not ``Skipped``; each skipped one is recorded and logged."""
        for result in results:
            if isinstance(result, Skipped):
                self.rows.append({"image_id": result.image_id, "path": result.path, "reason": result.reason})
                logger.warning("skipped %s", result.reason)
            else:
                yield result

    def write(self, folder: Path) -> Path:
        return write_table(folder / "skipped.csv", self.COLUMNS, self.rows)


@torch.inference_mode()
def predict_probabilities(
    model: torch.nn.Module,
    images: Sequence[np.ndarray],
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    tta: bool = False,
    rotations: bool = False,
) -> np.ndarray:
    """Lesion probabilities (N x H x W float32) for square images at the model's size.

    ``tta`` averages the image with its horizontal and vertical flips; with ``rotations`` too, over all eight flips
    and quarter turns (lesions have no up or down). Each view's output is turned back before averaging. The views go
    through the network as one batch (one call: on ONNX Runtime, one session run instead of three or eight).
    """
    x = to_device(model_input(images, images[0].shape[0], mean, std), device)  # square images at the model's size
    if tta and rotations:
        views = [(flip, turns) for flip in ((), (-1,)) for turns in range(4)]
    elif tta:
        views = [((), 0), ((-1,), 0), ((-2,), 0)]
    else:
        views = [((), 0)]
    batch = torch.cat([torch.rot90(x.flip(flip) if flip else x, turns, dims=(-2, -1)) for flip, turns in views])
    outs = torch.sigmoid(model(batch)).float().split(len(x))
    prob = torch.zeros_like(x[:, :1], dtype=torch.float32)
    for (flip, turns), out in zip(views, outs):
        out = torch.rot90(out, -turns, dims=(-2, -1))
        prob += out.flip(flip) if flip else out
    return (prob[:, 0] / len(views)).cpu().numpy()


@dataclass(frozen=True)
class _Hit:
    """An input whose crop the cache already holds."""

    image_id: str
    path: str
    key: str
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]


class _Preparing(Dataset):
    """``SegmentationPredictor.prepare`` over a list of inputs, for DataLoader workers (forked with the predictor)."""

    def __init__(self, items: Sequence[tuple[str, str]], predictor: SegmentationPredictor) -> None:
        self.items, self.predictor = items, predictor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Skipped | _Hit | Pending:
        return self.predictor.prepare(*self.items[index])


def _chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


class SegmentationPredictor:
    """Loads a trained U-Net and turns images into lesion crops, reusing every crop already in the cache."""

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        cfg: SegmentationConfig,
        device: torch.device,
        cache_root: str | os.PathLike | None = None,
        force: bool = False,
        crops: Mapping[str, Any] | None = None,
        strict: bool = False,
        workers: int = 0,
        engine: str = "pytorch",
        threads: int = 0,
        prefetch: int = 0,
    ) -> None:
        """``crops``: the crop settings the classifiers were trained with (they replace the config's); ``strict``:
        the config is the run's own or the user's, so a training setting that disagrees with the checkpoint's is
        refused (naming both values) instead of silently overridden by it; ``workers``: DataLoader worker processes
        that read, decode, check and look up the next images while the U-Net runs (0: all in this process);
        ``engine``: what runs the U-Net's forward (``onnxruntime``: the ONNX export beside the checkpoint, with
        ``threads`` intra-op threads when given); ``prefetch``: batches a thread reads, decodes and preprocesses ahead
        while the U-Net runs on this one (0: one after the other; the same crops either way)."""
        self.workers, self.prefetch = workers, prefetch
        self.model, self.meta = load_unet(checkpoint, device)
        self.weights = weights_digest(checkpoint)
        # the crops' cache key names what computed them: the checkpoint's digest, or the ONNX file's
        self.model, self.model_digest = engine_model(self.model, checkpoint, self.weights, engine, device, threads)
        self.device = device
        self.size = int(self.meta["input_size"])
        self.mean, self.std = self.meta["mean"], self.meta["std"]
        trained = self.meta.get("preprocess")
        self.preprocess_cfg: PreprocessConfig = PreprocessConfig(**trained) if trained else cfg.data.preprocess
        if strict:
            check_trained_setting(checkpoint, "data.image_size", self.size, cfg.data.image_size)
            check_trained_setting(
                checkpoint, "data.preprocess", asdict(self.preprocess_cfg), asdict(cfg.data.preprocess)
            )
        given = {k: crops[k] for k in CROP_SETTINGS if crops and k in crops}
        self.predict_cfg: SegPredictConfig = replace(cfg.predict, **given)
        self.cache = StageCache(cache_root or cfg.run.cache_dir, "crops", force=force)
        p = self.predict_cfg
        self.settings = {
            "size": self.size,
            "threshold": p.threshold,
            "tta": "dihedral" if p.tta and p.tta_rotations else p.tta,
            "margin": p.margin,
            "crop_size": p.crop_size,
            "min_area": p.min_area,
            "preprocess": asdict(self.preprocess_cfg),
            "decode": decode_size(p.crop_size),
            "quality": asdict(DEFAULT_QUALITY),
        }

    def crop_settings(self) -> dict[str, Any]:
        """What made the crops (recorded with them, so the classifiers trained on them predict on the same kind)."""
        settings = {k: getattr(self.predict_cfg, k) for k in CROP_SETTINGS}
        return {**settings, "preprocess": asdict(self.preprocess_cfg), "segmentation_weights": self.weights}

    def key(self, digest: str) -> str:
        return stage_key("crops", inputs=digest, settings=self.settings, model=self.model_digest)

    def crop(self, items: Iterable[tuple[str, str]]) -> Iterator[CropResult | Skipped]:
        """``(image_id, path)`` pairs -> a ``CropResult`` per image, or ``Skipped`` for an unreadable file, in the
        order of ``items`` whatever the cache holds. Streams in chunks of ``batch_size``: memory stays flat. With
        ``workers``, a DataLoader's worker processes prepare the next chunks while this one runs."""
        if self.workers:
            loader = DataLoader(
                _Preparing(list(items), self), batch_size=self.predict_cfg.batch_size, num_workers=self.workers,
                collate_fn=_as_list, worker_init_fn=end_with_parent,
            )  # fmt: skip
            for prepared in loader:
                self.cache.reused += sum(isinstance(p, _Hit) for p in prepared)  # counted in the worker's copy
                yield from self._crop_prepared(prepared)
            return
        for prepared in self._prepared_chunks(items):
            yield from self._crop_prepared(prepared)

    def _prepared_chunks(self, items: Iterable[tuple[str, str]]) -> Iterator[list[Skipped | _Hit | Pending]]:
        """Chunks of ``batch_size`` inputs prepared (``prepare``); with ``prefetch``, a thread prepares up to that many
        chunks ahead (decoding and hashing release the GIL: reading overlaps the networks' forward passes)."""
        chunks = _chunked(items, self.predict_cfg.batch_size)
        if not self.prefetch:
            yield from ([self.prepare(*i) for i in chunk] for chunk in chunks)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="dermpipe-read") as reader:
            ahead: deque[Future] = deque()
            for chunk in chunks:
                ahead.append(reader.submit(lambda c=chunk: [self.prepare(*i) for i in c]))
                if len(ahead) > self.prefetch:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()

    def prepare(self, image_id: str, path: str) -> Skipped | _Hit | Pending:
        """One input read, decoded, checked and looked up in the cache: what can run apart from the U-Net."""
        try:
            digest = file_digest(path)
        except (OSError, FileInputError) as e:
            return Skipped(image_id, path, f"cannot read file ({getattr(e, 'strerror', None) or e})")
        key = self.key(digest)
        hit = self.cache.get(key)
        if hit is not None:
            return _Hit(image_id, path, key, *hit)
        return self._read(image_id, path, key)

    def _read(self, image_id: str, path: str, key: str) -> Skipped | Pending:
        """One input read, decoded, checked and preprocessed for the U-Net."""
        try:
            original = image_size(path)
            image = read_image(path, max_side=decode_size(self.predict_cfg.crop_size))
        except ImageReadError as e:
            return Skipped(image_id, path, str(e))
        quality = assess_quality(image, original)  # on the photo as taken, before any preprocessing
        return (image_id, path, key, preprocess(image, self.preprocess_cfg), original, quality, photo_thumbnail(image))

    def _crop_prepared(self, prepared: Sequence[Skipped | _Hit | Pending]) -> list[CropResult | Skipped]:
        results: list[CropResult | Skipped | None] = [None] * len(prepared)
        todo: list[tuple[int, Pending]] = []
        for i, p in enumerate(prepared):
            if isinstance(p, Skipped):
                results[i] = p
            elif isinstance(p, _Hit):
                results[i] = self._result(p.image_id, p.path, p.key, p.arrays, p.meta)
            else:
                todo.append((i, p))
        if todo and len(todo) < sum(not isinstance(p, Skipped) for p in prepared):
            # the hits beside a miss run again too, so the U-Net sees the batch a run with nothing cached saw: a
            # forward pass's last bits depend on the batch's size and on an image's place in it, and a recomputed
            # entry must equal the first computation; their results are dropped, their entries stay as they are
            again = [(i, self._read(p.image_id, p.path, p.key)) for i, p in enumerate(prepared) if isinstance(p, _Hit)]
            todo = sorted(todo + [(i, t) for i, t in again if not isinstance(t, Skipped)], key=lambda it: it[0])
        if todo:
            missed = [results[i] is None for i, _ in todo]
            for (i, _), result in zip(todo, self._run_batch([t for _, t in todo], missed)):
                if result is not None:
                    results[i] = result
        return results  # type: ignore[return-value]

    def _run_batch(self, batch: list[Pending], keep: Sequence[bool] | None = None) -> Iterator[CropResult | None]:
        """The U-Net over ``batch``: each image's crop, stored in the cache, or ``None`` where ``keep`` says not."""
        p = self.predict_cfg
        probs = predict_probabilities(
            self.model,
            [resize_square(b[3], self.size) for b in batch],
            self.mean,
            self.std,
            self.device,
            p.tta,
            p.tta_rotations,
        )
        for n, ((image_id, path, key, image, (height, width), quality, thumb), prob) in enumerate(zip(batch, probs)):
            if keep is not None and not keep[n]:
                yield None
                continue
            h, w = image.shape[:2]
            mask = clean_mask(cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR) > p.threshold)
            box = lesion_box(mask, p.margin, p.min_area)
            crop = crop_to_lesion(image, box, p.crop_size)
            sx, sy = width / w, height / h  # the image may have been decoded reduced: box in original pixels
            full = LesionBox(
                round(box.x0 * sx),
                round(box.y0 * sy),
                round(box.x1 * sx),
                round(box.y1 * sy),
                box.mask_area,
                box.fallback,
            )
            arrays = {"crop": crop, "probability": np.round(prob * 255).astype(np.uint8), "thumbnail": thumb}
            meta = {
                "box": [full.x0, full.y0, full.x1, full.y1],
                "mask_area": full.mask_area,
                "fallback": full.fallback,
                "height": height,
                "width": width,
                "quality": [*quality, *([QUALITY_NO_LESION] if box.fallback == FALLBACK_NO_LESION else [])],
            }
            self.cache.put(key, arrays, meta)
            yield self._result(image_id, path, key, arrays, meta)

    @staticmethod
    def _result(image_id: str, path: str, key: str, arrays: dict[str, np.ndarray], meta: dict) -> CropResult:
        box = LesionBox(*meta["box"], mask_area=float(meta["mask_area"]), fallback=meta["fallback"])
        return CropResult(
            image_id,
            path,
            arrays["crop"],
            key,
            box,
            arrays["probability"],
            int(meta["height"]),
            int(meta["width"]),
            tuple(meta.get("quality", ())),
            arrays.get("thumbnail"),
        )
