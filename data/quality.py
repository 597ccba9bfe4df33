"""Input quality checks: flag images the models cannot judge (tiny, flat, under- or over-exposed, blurred)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

# The reason prediction gives when the segmentation finds no lesion and the whole image is classified instead.
QUALITY_NO_LESION = "no lesion found: the whole image was classified"
# Separator of the reasons in one CSV cell (no reason of this module contains it).
QUALITY_SEPARATOR = "; "

# Rec. 601 luma weights (as OpenCV's RGB2GRAY), applied in floating point so no rounding noise enters the statistics.
_GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)


@dataclass(frozen=True)
class QualityConfig:
    """Thresholds of :func:`assess_quality`.

    Chosen so that none of the 11,297 ISIC 2018 / HAM10000 images in ``shared/data/isic_real`` and no synthetic image
    (64-512 px, hair, ruler and vignette on) is flagged; the measured distributions and margins are in the
    docstring of :func:`quality_statistics`. Every statistic except the size is measured on the image area-resized
    so that its longer side is at most ``measure_side``, so a JPEG decoded at 1/2 or 1/4 size gets the same verdict.
    """

    min_side: int = 64  # shorter side of the original image, in pixels
    measure_side: int = 256  # longer side the statistics are measured at (smaller images: their own size)
    min_dynamic_range: float = 12.0  # largest 1st..99th percentile spread over the R, G, B channels, of 255
    min_bright: float = 48.0  # 99th percentile of the grey levels, of 255
    max_clipped: float = 0.5  # fraction of the lit field of view whose grey level is at least clip_level
    clip_level: float = 250.0
    dark_level: float = 32.0  # grey levels below this are outside the field of view (a dermatoscope's black corners)
    min_laplacian_variance: float = 2.0  # variance of the 3x3 Laplacian of the grey image at measure_side


DEFAULT_QUALITY = QualityConfig()


def _as_rgb(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image array, got {getattr(image, 'dtype', type(image).__name__)}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3) or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"expected an HxWx3 RGB (or HxW grey) image, got shape {image.shape}")
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def _measured(image: np.ndarray, side: int) -> np.ndarray:
    """The image as float32 RGB, area-resized so that its longer side is at most ``side``."""
    pixels = image.astype(np.float32)
    height, width = pixels.shape[:2]
    if max(height, width) > side:
        scale = side / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
    return pixels


def quality_statistics(image: np.ndarray, config: QualityConfig = DEFAULT_QUALITY) -> dict[str, float]:
    """The statistics :func:`assess_quality` thresholds, measured on a decoded uint8 RGB image.

    ``dynamic_range``: the largest spread between the 1st and 99th percentile of one colour channel (a faint
    yellow lesion on beige skin has more contrast in colour than in grey). ``brightness``: the 99th percentile of
    the grey levels. ``clipped``: the pixels at or above ``clip_level`` as a fraction of the lit field of view (the
    pixels at or above ``dark_level``, counted as at least half the image), so a dermatoscope's black corners do not
    hide an over-exposed field and a few highlights in a dark image are not over-exposure. ``laplacian_variance``: the
    variance of the 3x3 Laplacian of the float grey image (no rounding: 8-bit rounding alone would add about 1.7).

    Measured on all 11,297 images of ``shared/data/isic_real`` (512x512 ISIC 2018 Task 1 and 200x150 HAM10000
    JPEGs) and on 964 synthetic images (all 7 classes, 64-512 px, hair/vignette/ruler always, by default and never,
    some without lesion, 180 written as JPEG by ``generate_dataset`` and read back), as min / 0.1% / 1% / 50% / max:

    ==================== ================================== ==================================
    statistic            real                               synthetic
    ==================== ================================== ==================================
    dynamic_range        34.8 / 43 / 57 / 132 / 255         24 / 24.5 / 33 / 183 / 245
    brightness           93.9 / 119 / 139 / 188 / 255       147 / 147 / 150 / 195 / 247
    clipped              max 0.305 (99.9%: 0.138)           max 0.001
    laplacian_variance   4.67 / 7.3 / 11.1 / 59 / 5065      10.5 / 11.7 / 13.4 / 1016 / 44407
    ==================== ================================== ==================================

    Against the defaults the nearest image is 2.9x (real) / 2.0x (synthetic) above the range threshold, 1.96x / 3.1x
    above the brightness one, 0.195 / 0.50 below the clipped fraction and 2.3x / 5.3x above the Laplacian one.
    Blurring the real images with a Gaussian of sigma 1, 1.5, 2, 3 (in pixels at the measuring size; sigma 2 at
    256 px is sigma 8 on a 1024 px photo) flags about 3%, 52%, 87% and 99.6% of them: only heavy blur is flagged.
    """
    pixels = _measured(_as_rgb(image), config.measure_side)
    grey = pixels @ _GREY_WEIGHTS
    low, high = np.percentile(pixels.reshape(-1, 3), [1, 99], axis=0)
    return {
        "dynamic_range": float(np.max(high - low)),
        "brightness": float(np.percentile(grey, 99)),
        "clipped": float(np.mean(grey >= config.clip_level) / max(np.mean(grey >= config.dark_level), 0.5)),
        "laplacian_variance": float(cv2.Laplacian(np.ascontiguousarray(grey), cv2.CV_32F, ksize=1).var()),
    }


def assess_quality(
    image: np.ndarray, original_size: tuple[int, int], config: QualityConfig = DEFAULT_QUALITY
) -> list[str]:
    """Why the models cannot judge this image: short human-readable reasons, an empty list when it looks fine.

    ``image`` is the decoded uint8 RGB image (``read_image`` output, possibly reduced for decoding);
    ``original_size`` is the file's (height, width). An image below ``min_side`` gets only the size reason: the
    other statistics mean little on so few pixels. Blur is judged only when range and exposure are fine: a flat or
    dark image has little contrast for the Laplacian to see, whatever its focus.
    """
    height, width = (int(v) for v in original_size)
    if height < 1 or width < 1:
        raise ValueError(f"original_size must be a positive (height, width), got {tuple(original_size)}")
    if min(height, width) < config.min_side:
        return [f"too small: {width}x{height} px (below {config.min_side} px)"]
    stats = quality_statistics(image, config)
    reasons = []
    if stats["dynamic_range"] < config.min_dynamic_range:
        reasons.append(
            f"low dynamic range: {stats['dynamic_range']:.0f} levels from 1st to 99th percentile "
            f"(below {config.min_dynamic_range:g})"
        )
    if stats["brightness"] < config.min_bright:
        reasons.append(
            f"under-exposed: 99th-percentile brightness {stats['brightness']:.0f} of 255 (below {config.min_bright:g}"
            ", e.g. 12-bit data in a 16-bit file)"
        )
    if stats["clipped"] > config.max_clipped:
        reasons.append(
            f"over-exposed: {100 * stats['clipped']:.0f}% of the lit area clipped white "
            f"(above {100 * config.max_clipped:g}%)"
        )
    if not reasons and stats["laplacian_variance"] < config.min_laplacian_variance:
        reasons.append(
            f"blurred: Laplacian variance {stats['laplacian_variance']:.2f} at {config.measure_side} px "
            f"(below {config.min_laplacian_variance:g})"
        )
    return reasons


def quality_text(reasons: Sequence[str]) -> str:
    """The reasons as one CSV cell, ``"; "``-separated; an empty string when there are none."""
    return QUALITY_SEPARATOR.join(r.strip() for r in reasons if r and r.strip())
