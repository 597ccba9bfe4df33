"""Writing a synthetic data set to disk: images, exact masks and a manifest with grouped splits."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from dermpipe.data.generator.painter import check_sample_args, make_lesion_views
from dermpipe.data.generator.profiles import DEFAULT_CLASSES, SyntheticDataError, class_profile
from dermpipe.data.manifest import Manifest
from dermpipe.data.reading import write_image
from dermpipe.data.splits import assign_splits

logger = logging.getLogger(__name__)

IMAGE_FORMATS: tuple[str, ...] = ("jpg", "png")


def class_counts(n_images: int, n_classes: int, imbalance: float) -> list[int]:
    """Images per class: shares decay geometrically so that the first over the last class is ``imbalance``."""
    if n_classes == 1:
        return [n_images]
    shares = imbalance ** (-np.arange(n_classes) / (n_classes - 1))
    raw = n_images * shares / shares.sum()
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n_images - counts.sum()]:
        counts[i] += 1
    # Every class present whenever there are enough images; taken from the largest class.
    for i in range(n_classes):
        if counts[i] == 0 and n_images >= n_classes:
            counts[int(np.argmax(counts))] -= 1
            counts[i] = 1
    return counts.tolist()


def _write_image(path: Path, pixels: np.ndarray, image_format: str) -> None:
    """Write an RGB image or a single-channel mask (a failed write is one error naming the file)."""
    write_image(path, pixels, [cv2.IMWRITE_JPEG_QUALITY, 95] if image_format == "jpg" else [])


def _check_arguments(
    n_images: int,
    size: int,
    seed: int,
    classes: tuple[str, ...],
    imbalance: float,
    images_per_lesion: tuple[int, int],
    hair: float,
    vignette: float,
    ruler: float,
    fractions: tuple[float, float, float],
    image_format: str,
) -> None:
    """Every argument of ``generate_dataset`` checked before a file is written (one error naming the value)."""
    lo, hi = images_per_lesion
    if n_images < 1:
        raise SyntheticDataError(f"the number of images must be at least 1, got {n_images}")
    if not classes or len(set(classes)) != len(classes) or any(not c for c in classes):
        raise SyntheticDataError(f"classes {list(classes)} must be distinct, non-empty names")
    if imbalance < 1:
        raise SyntheticDataError(f"imbalance is most over least frequent class, at least 1; got {imbalance}")
    if not 1 <= lo <= hi:
        raise SyntheticDataError(f"images per lesion {images_per_lesion} must be (low, high) with 1 <= low <= high")
    if image_format not in IMAGE_FORMATS:
        raise SyntheticDataError(f"image format {image_format!r} is not one of {list(IMAGE_FORMATS)}")
    if seed < 0:
        raise SyntheticDataError(f"seed must be a non-negative integer, got {seed}")
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise SyntheticDataError(f"split fractions {tuple(fractions)} must be three non-negative numbers summing to 1")
    check_sample_args(size, hair, vignette, ruler)
    for name in classes:
        class_profile(name)


def generate_dataset(
    out_dir: str | Path,
    n_images: int = 200,
    size: int = 128,
    seed: int = 0,
    classes: Sequence[str] = DEFAULT_CLASSES,
    imbalance: float = 4.0,
    images_per_lesion: tuple[int, int] = (1, 3),
    hair: float = 0.3,
    vignette: float = 0.5,
    ruler: float = 0.1,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    image_format: str = "jpg",
) -> Path:
    """Write ``n_images`` synthetic images, their masks and ``manifest.csv`` (grouped splits) into ``out_dir``.

    Layout: ``images/SYN_0000000.jpg``, ``masks/SYN_0000000_segmentation.png`` (0/255) and ``manifest.csv`` with
    paths relative to ``out_dir``; each lesion (``group`` LES_000000) has ``images_per_lesion`` views. The same
    arguments give byte-identical files. Returns the manifest path.
    """
    classes = tuple(classes)
    lo, hi = images_per_lesion
    _check_arguments(n_images, size, seed, classes, imbalance, images_per_lesion, hair, vignette, ruler, fractions,
                     image_format)  # fmt: skip
    layout_rng = np.random.default_rng(seed)
    lesions: list[tuple[str, int]] = []
    for name, count in zip(classes, class_counts(n_images, len(classes), imbalance)):
        while count > 0:
            views = min(count, int(layout_rng.integers(lo, hi + 1)))
            lesions.append((name, views))
            count -= views
    lesions = [lesions[i] for i in layout_rng.permutation(len(lesions))]
    slots = [(lesion, view) for lesion, (_, views) in enumerate(lesions) for view in range(views)]
    image_index = {slot: i for i, slot in enumerate(slots[j] for j in layout_rng.permutation(len(slots)))}

    out_dir = Path(out_dir)
    try:
        (out_dir / "images").mkdir(parents=True, exist_ok=True)
        (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SyntheticDataError(f"cannot create the output folder {out_dir}: {err.strerror}") from None
    rows: list[dict[str, str]] = [{} for _ in slots]
    for lesion_index, (label, views) in enumerate(tqdm(lesions, desc="synthetic lesions", disable=None, leave=False)):
        rng = np.random.default_rng([seed, lesion_index])  # a lesion's pixels do not depend on the others
        images = make_lesion_views(rng, label, views, size, hair=hair, vignette=vignette, ruler=ruler)
        for view, (rgb, mask) in enumerate(images):
            index = image_index[(lesion_index, view)]
            image_id = f"SYN_{index:07d}"
            image_path = Path("images") / f"{image_id}.{image_format}"
            mask_path = Path("masks") / f"{image_id}_segmentation.png"
            _write_image(out_dir / image_path, rgb, image_format)
            _write_image(out_dir / mask_path, mask * 255, "png")
            rows[index] = {
                "image_id": image_id,
                "image_path": image_path.as_posix(),
                "mask_path": mask_path.as_posix(),
                "label": label,
                "group": f"LES_{lesion_index:06d}",
                "split": "",
            }
    info = {"source": "synthetic", "seed": seed, "size": size, "imbalance": imbalance}
    try:
        manifest = assign_splits(Manifest(rows=tuple(rows), classes=classes, info=info), fractions, seed)
    except ValueError as err:  # scikit-learn's stratified splitter refuses classes smaller than its folds
        raise SyntheticDataError(
            f"cannot split {n_images} images of {len(lesions)} lesions into train/val/test {tuple(fractions)}: "
            f"use more images (--n) or fewer classes ({err})"
        ) from None
    path = manifest.write(out_dir / "manifest.csv")
    stale = sum(1 for _ in (out_dir / "images").iterdir()) - n_images
    if stale > 0:
        logger.warning(
            "%s/images holds %d files from an earlier run that the new manifest does not list", out_dir, stale
        )
    logger.info("wrote %d synthetic images of %d lesions to %s", n_images, len(lesions), out_dir)
    return path
