"""Image and mask augmentation built from a config with albumentations (Buslaev et al. 2020), plus synthetic hair."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from dermpipe.data.augment_config import AugmentConfig

logger = logging.getLogger(__name__)


class SyntheticHair(A.ImageOnlyTransform):
    """Draw a few thin, dark, gently curved strands across the image, so models learn to look through hair.

    Each strand is a quadratic Bezier curve between two random points on the image border, anti-aliased, in a dark
    brown-black shade. Random draws use the transform's own generator, so ``Compose(seed=...)`` reproduces them.
    """

    class InitSchema(A.core.transforms_interface.BaseTransformInitSchema):
        num_hairs: tuple[int, int] = (2, 8)
        thickness: tuple[int, int] = (1, 2)

    def __init__(self, num_hairs: tuple[int, int] = (2, 8), thickness: tuple[int, int] = (1, 2), p: float = 0.5):
        super().__init__(p=p)
        self.num_hairs = tuple(num_hairs)
        self.thickness = tuple(thickness)

    def _border_point(self, side: int, height: int, width: int) -> np.ndarray:
        t = self.py_random.random()
        points = {0: (t * width, 0.0), 1: (t * width, height - 1.0), 2: (0.0, t * height), 3: (width - 1.0, t * height)}
        return np.array(points[side])

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        strands = []
        for _ in range(self.py_random.randint(*self.num_hairs)):
            # Two different sides of the border, so every strand crosses the image.
            start_side, end_side = self.py_random.sample(range(4), 2)
            start, end = self._border_point(start_side, height, width), self._border_point(end_side, height, width)
            # Bend the strand by pushing its control point off the straight line by up to a quarter of its length.
            middle = (start + end) / 2
            direction = end - start
            normal = np.array([-direction[1], direction[0]]) / (np.linalg.norm(direction) + 1e-6)
            bend = self.py_random.uniform(-0.25, 0.25) * np.linalg.norm(direction)
            control = middle + bend * normal
            t = np.linspace(0.0, 1.0, 64)[:, None]
            curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end
            shade = self.py_random.randint(10, 60)
            colour = (shade + 15, shade + 5, shade)  # RGB: slightly warm, like pigmented hair
            strands.append((np.round(curve * 16).astype(np.int32), colour, self.py_random.randint(*self.thickness)))
        return {"strands": strands}

    def apply(self, img: np.ndarray, strands: list | None = None, **params: Any) -> np.ndarray:
        out = img.copy()
        for points, colour, thickness in strands or []:
            paint = colour if out.ndim == 3 and out.shape[2] == 3 else (sum(colour) / 3,)
            # shift=4: the points carry 4 fractional bits, giving smooth sub-pixel curves.
            cv2.polylines(out, [points], False, paint, int(thickness), cv2.LINE_AA, shift=4)
        return out


def _colour_range(amount: float) -> tuple[float, float]:
    return (max(0.0, 1.0 - amount), 1.0 + amount)


def build_transform(
    cfg: AugmentConfig,
    size: int,
    train: bool,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
) -> A.Compose:
    """The transform for one stage: called as ``t(image=rgb_uint8, mask=mask_uint8)``; image and mask move together.

    ``train`` (and ``cfg.enabled``): flips, rotation, scale/shift, colour jitter, blur/sharpen and synthetic hair, each
    with its probability, then a resize to ``size`` x ``size``; otherwise the resize alone, which is deterministic.
    With ``mean`` and ``std`` (0-1 scale, e.g. from timm's data config) the image is normalised and both become
    tensors (image CxHxW float, mask HxW); without them the output stays uint8 numpy for caching and inspection.

    The Compose draws from its own generator: in DataLoader workers call ``set_random_seed`` on it with a per-worker
    seed (e.g. ``torch.initial_seed() % 2**32`` in ``worker_init_fn``), or forked workers repeat each other's draws.
    """
    if size < 1:
        raise ValueError(f"transform size must be a positive number of pixels, got {size}")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std (normalise to tensors) or neither (keep uint8 arrays)")
    steps: list[A.BasicTransform] = []
    if train and cfg.enabled:
        if cfg.hflip > 0:
            steps.append(A.HorizontalFlip(p=cfg.hflip))
        if cfg.vflip > 0:
            steps.append(A.VerticalFlip(p=cfg.vflip))
        # Reflected borders continue the skin instead of painting black corners that look like a dermoscope's
        # vignette; the mask is reflected the same way, so it stays aligned.
        if cfg.rotate_p > 0 and cfg.rotate_limit > 0:
            steps.append(A.Rotate(limit=cfg.rotate_limit, border_mode=cv2.BORDER_REFLECT_101, p=cfg.rotate_p))
        if cfg.affine_p > 0 and (cfg.scale_limit > 0 or cfg.shift_limit > 0):
            steps.append(
                A.Affine(
                    scale=(1.0 - cfg.scale_limit, 1.0 + cfg.scale_limit),
                    translate_percent=(-cfg.shift_limit, cfg.shift_limit),
                    border_mode=cv2.BORDER_REFLECT_101,
                    p=cfg.affine_p,
                )
            )
        if cfg.synthetic_hair_p > 0:
            steps.append(SyntheticHair(p=cfg.synthetic_hair_p))
        if cfg.colour_p > 0:
            steps.append(
                A.ColorJitter(
                    brightness=_colour_range(cfg.brightness),
                    contrast=_colour_range(cfg.contrast),
                    saturation=_colour_range(cfg.saturation),
                    hue=(-cfg.hue, cfg.hue),
                    p=cfg.colour_p,
                )
            )
        if cfg.blur_p > 0:
            steps.append(A.GaussianBlur(blur_limit=(3, 5), p=cfg.blur_p))
        if cfg.sharpen_p > 0:
            steps.append(A.Sharpen(alpha=(0.1, 0.3), lightness=(0.9, 1.1), p=cfg.sharpen_p))
    # INTER_AREA when shrinking avoids aliasing on large crops; the mask always uses nearest neighbour.
    steps.append(A.Resize(size, size, interpolation=cv2.INTER_LINEAR, area_for_downscale="image", p=1.0))
    if mean is not None and std is not None:
        steps.append(A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0, p=1.0))
        steps.append(ToTensorV2(p=1.0))
    return A.Compose(steps)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "value") and isinstance(value.value, (int, float, str)):  # enums
        return value.value
    return repr(value)


def transform_fingerprint(transform: A.BasicTransform) -> dict:
    """A JSON-safe description of every setting of ``transform`` (``A.to_dict``), for the stage cache key.

    Two transforms built from equal configs give equal fingerprints; any changed setting changes it.
    """
    description = _json_safe(A.to_dict(transform))
    # Round trip: what the cache hashes must be exactly what JSON can store and read back.
    return json.loads(json.dumps(description, sort_keys=True))
