"""Decoded pixels to RGB uint8 (EXIF orientation, bit depth, alpha and grey, converted in bands of rows so memory
stays bounded), and the error of an image that cannot be read."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from dermpipe.errors import DermpipeError


class ImageReadError(DermpipeError):
    """An image or mask file that cannot be read; the message is ``"<path>: <what is wrong> (<fix>)"``."""


class ImageTooLargeError(ImageReadError):
    """An image whose header declares more decoded bytes than it is safe to decode (``MAX_DECODED_BYTES``): a bomb or
    a scan."""


_CONVERT_PIXELS = 1 << 20  # pixels per band of rows in a bit-depth or alpha conversion


def _apply_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    """Turn stored pixels upright as EXIF orientation 1..8 says (the same as Pillow's ``ImageOps.exif_transpose``)."""
    if orientation == 2:
        return cv2.flip(array, 1)
    if orientation == 3:
        return cv2.rotate(array, cv2.ROTATE_180)
    if orientation == 4:
        return cv2.flip(array, 0)
    if orientation == 5:
        return cv2.transpose(array)
    if orientation == 6:
        return cv2.rotate(array, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:
        return cv2.rotate(cv2.transpose(array), cv2.ROTATE_180)
    if orientation == 8:
        return cv2.rotate(array, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return array


def _to_unit_float(array: np.ndarray, path: Path) -> np.ndarray:
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    raise ImageReadError(f"{path}: {array.dtype} pixels are not supported (save it as an 8- or 16-bit image)")


def _by_rows(array: np.ndarray, channels: int, convert: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``convert`` (elementwise per pixel, to uint8 with ``channels`` channels) applied a band of rows at a time, so
    its float or wide-integer temporaries take a few MB whatever the image's size, not several times the image."""
    height, width = array.shape[:2]
    out = np.empty((height, width, channels), np.uint8)
    rows = max(1, _CONVERT_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        out[top : top + rows] = convert(array[top : top + rows])
    return out


def _to_uint8(array: np.ndarray, path: Path) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        # Full 16-bit range onto 8 bits (65535 -> 255); no per-image stretching, so colours stay comparable.
        squeeze = array.ndim == 2
        wide = array[:, :, None] if squeeze else array
        out = _by_rows(wide, wide.shape[2], lambda band: ((band.astype(np.uint32) + 128) // 257).astype(np.uint8))
        return out[:, :, 0] if squeeze else out
    raise ImageReadError(f"{path}: {array.dtype} pixels are not supported (save it as an 8- or 16-bit image)")


def _unchanged_to_rgb(array: np.ndarray, path: Path) -> np.ndarray:
    """Any channel layout OpenCV returns with IMREAD_UNCHANGED -> HxWx3 uint8 RGB.

    Transparency is composited over white, as an image viewer shows it; dropping alpha instead would expose whatever
    colour happens to be stored under fully transparent pixels (often black, which looks like lesion).
    """
    if array.ndim == 2:
        array = array[:, :, None]
    channels = array.shape[2]
    if channels in (2, 4):

        def composite(band: np.ndarray) -> np.ndarray:
            colour = _to_unit_float(band[:, :, :-1], path)
            alpha = _to_unit_float(band[:, :, -1:], path)
            return np.clip((colour * alpha + (1.0 - alpha)) * 255.0 + 0.5, 0, 255).astype(np.uint8)

        channels -= 1
        array = _by_rows(array, channels, composite)
    else:
        array = _to_uint8(array, path)
    if channels == 1:
        return cv2.cvtColor(array, cv2.COLOR_GRAY2RGB)
    if channels == 3:
        return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    raise ImageReadError(f"{path}: images with {channels} channels are not supported (save it as RGB or grayscale)")
