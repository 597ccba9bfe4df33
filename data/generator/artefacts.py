"""The skin under a lesion and what a dermatoscope adds to a photo (hair, a ruler, vignetting), and the noise fields
the painter draws textures with."""

from __future__ import annotations

import functools

import cv2
import numpy as np


def _skin(rng: np.random.Generator, tone: np.ndarray, size: int) -> np.ndarray:
    scale = size / 128.0
    shape = (size, size)
    blotch = _smooth_noise(rng, shape, 5, 2)  # lightness and redness
    # Skin furrows at half resolution: faint, and the band-pass blurs dominate the cost of a skin patch.
    half = (max(8, size // 2), max(8, size // 2))
    furrows = np.exp(-((_band_noise(rng, half, rng.uniform(4, 7) * scale) / 0.3) ** 2))
    furrows = cv2.resize(furrows, (size, size), interpolation=cv2.INTER_LINEAR)
    grain = cv2.GaussianBlur(rng.standard_normal(shape, dtype=np.float32), (0, 0), 0.7 * scale)
    light = (1 + 0.025 * blotch[..., 0] - 0.015 * furrows + 0.012 * grain)[..., None]
    redness = (0.012 * blotch[..., 1])[..., None] * np.array([1.0, -1.0, -0.5], np.float32)
    return tone * (light + redness)


def _draw_hair(rng: np.random.Generator, image: np.ndarray, size: int) -> None:
    scale = size / 128.0
    n = 1 + int(rng.poisson(4)) if rng.random() < 0.7 else 8 + int(rng.poisson(8))
    base = rng.uniform(20, 70)
    t = np.linspace(0, 1, 24)[:, None]
    for _ in range(n):
        start = rng.uniform(-0.1, 1.1, 2) * size
        heading = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(0.3, 1.2) * size
        end = start + length * np.array([np.cos(heading), np.sin(heading)])
        bend = (start + end) / 2 + rng.normal(0, 0.15, 2) * length
        curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t**2 * end  # quadratic Bezier
        shade = base + rng.uniform(-10, 15)
        thickness = max(1, int(round(scale * rng.uniform(0.6, 1.6))))
        cv2.polylines(
            image,
            [np.round(curve * 16).astype(np.int32)],
            False,
            (shade * 1.15, shade * 0.95, shade * 0.85),
            thickness,
            cv2.LINE_AA,
            shift=4,
        )


def _draw_ruler(rng: np.random.Generator, image: np.ndarray, size: int) -> None:
    scale = size / 128.0
    side = int(rng.integers(4))
    offset = rng.uniform(0.05, 0.12) * size
    start, stop = sorted(rng.uniform(0.05, 0.95, 2) * size)
    if stop - start < 0.3 * size:
        start, stop = 0.15 * size, 0.85 * size
    spacing = rng.uniform(3.5, 6) * scale
    shade = rng.uniform(20, 80)
    thickness = max(1, int(round(0.7 * scale)))
    # Lines in (along, across) coordinates; ``side`` decides which edge they hug.
    lines = [((start, offset), (stop, offset))]
    for i, along in enumerate(np.arange(start, stop, spacing)):
        tick = (5 if i % 10 == 0 else 3.5 if i % 5 == 0 else 2) * scale
        lines.append(((along, offset), (along, offset + tick)))
    for a, b in lines:
        cv2.line(
            image,
            _ruler_point(a, side, size),
            _ruler_point(b, side, size),
            (shade, shade, shade),
            thickness,
            cv2.LINE_AA,
            shift=4,
        )


def _ruler_point(p: tuple[float, float], side: int, size: int) -> tuple[int, int]:
    along, across = p
    x, y = [(along, across), (along, size - 1 - across), (across, along), (size - 1 - across, along)][side]
    return int(round(x * 16)), int(round(y * 16))


def _vignette(rng: np.random.Generator, size: int) -> np.ndarray:
    """The dermatoscope's round field of view: corners almost black, the rim of the circle slightly dark."""
    yy, xx = _grid(size)
    cx, cy = (size - 1) / 2 + rng.normal(0, 0.02 * size, 2)
    dist = np.sqrt((xx - np.float32(cx)) ** 2 + (yy - np.float32(cy)) ** 2) / size
    radius = rng.uniform(0.5, 0.68)
    field = 1.0 / (1.0 + np.exp((dist - radius) / rng.uniform(0.015, 0.04)))
    falloff = np.clip(1 - rng.uniform(0.05, 0.25) * (dist / radius) ** 2, 0, 1)
    floor = rng.uniform(0.02, 0.1)
    return floor + (1 - floor) * field * falloff


@functools.lru_cache(maxsize=32)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (y, x) of a square image, float32, shared and read-only."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int, channels: int = 1) -> np.ndarray:
    """Blotchy noise of about ``cells`` blobs across, roughly unit variance, float32 (H, W) or (H, W, channels)."""
    grid = rng.standard_normal((cells + 1, cells + 1, channels), dtype=np.float32)
    return cv2.resize(grid, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def _band_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Band-passed white noise whose zero crossings draw a mesh of cells about ``scale`` pixels wide."""
    white = rng.standard_normal(shape, dtype=np.float32)
    band = cv2.GaussianBlur(white, (0, 0), scale * 0.25) - cv2.GaussianBlur(white, (0, 0), scale * 0.5)
    return band / (band.std() + 1e-6)
