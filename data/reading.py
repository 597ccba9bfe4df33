"""Robust image and mask reading: JPEG/PNG/BMP/TIFF, EXIF orientation, any bit depth to 8-bit RGB, early reduction."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import struct
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from dermpipe.engine.files import write_atomic
from dermpipe.errors import DermpipeError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
# Name endings of mask files that sit beside their images (ISIC *_segmentation / *_Segmentation, PH2 *_lesion) and
# of the ISIC 2017 superpixel maps, which are not photographs either.
MASK_SUFFIXES: tuple[str, ...] = ("_segmentation", "_lesion", "_superpixels")

# Pillow format names we decode; MPO is the multi-picture JPEG some cameras write.
_FORMATS: dict[str, str] = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "BMP": "BMP", "TIFF": "TIFF"}
_REDUCED_FLAGS: dict[int, int] = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}
_FIX_CORRUPT = "re-download or re-export the file, or remove it from the manifest"
_EXIF_ORIENTATION_TAG = 274


class ImageReadError(DermpipeError):
    """An image or mask file that cannot be read; the message is ``"<path>: <what is wrong> (<fix>)"``."""


@dataclass(frozen=True)
class _Header:
    format: str  # JPEG, PNG, BMP or TIFF
    height: int  # as stored, before EXIF orientation
    width: int
    orientation: int  # EXIF orientation 1..8 (1 = as stored)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ImageReadError(f"{path}: no such file (check the path and the manifest's image_path/mask_path)")
    if path.is_dir():
        raise ImageReadError(f"{path}: is a folder, not an image file (point to the image file itself)")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: file is empty (0 bytes) ({_FIX_CORRUPT})")


def _read_bytes(path: Path) -> bytes:
    _check_file(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ImageReadError(f"{path}: cannot be read: {error.strerror or error} (check its permissions)") from None
    if not data:
        raise ImageReadError(f"{path}: file is empty (0 bytes) ({_FIX_CORRUPT})")
    return data


def _orientation(image: Image.Image) -> int:
    # PNG keeps EXIF in an eXIf chunk; Pillow's getexif() would decode the whole PNG to find a late one, so only the
    # chunk seen while reading the header counts (the same rule for image_size and read_image).
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    try:
        value = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block must not make a readable image unreadable
        return 1
    return int(value) if isinstance(value, int) and 1 <= value <= 8 else 1


def _header(path: Path, source: Path | bytes, verify: bool = False) -> _Header:
    """Format, stored size and EXIF orientation from the file header (Pillow opens lazily: no pixel decode).

    ``verify`` also checks a PNG's chunk checksums (cheap, no decompression): libpng reports a corrupt chunk on stderr
    by itself before OpenCV gives up, and the user should see only our one message.
    """
    try:
        # Pillow warns (stderr) about some damaged headers before failing; the error below says it once.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        with image:
            image_format = image.format or ""
            width, height = image.size
            orientation = _orientation(image)
            if verify and image_format == "PNG":
                image.verify()
    except Image.DecompressionBombError as error:
        raise ImageReadError(f"{path}: image is too large to decode safely: {error} (downscale it first)") from None
    except UnidentifiedImageError:
        raise ImageReadError(
            f"{path}: not a readable image: unknown format or corrupt header ({_FIX_CORRUPT}; supported: JPEG, PNG, "
            "BMP, TIFF)"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as error:
        raise ImageReadError(f"{path}: corrupt or truncated image file: {error} ({_FIX_CORRUPT})") from None
    if image_format not in _FORMATS:
        what = image_format or "unknown"
        raise ImageReadError(f"{path}: {what} images are not supported (convert it to PNG or JPEG)")
    if width < 1 or height < 1:
        raise ImageReadError(f"{path}: image has no pixels ({width}x{height}) ({_FIX_CORRUPT})")
    return _Header(_FORMATS[image_format], height, width, orientation)


@contextlib.contextmanager
def _quiet_opencv() -> Iterator[None]:
    # OpenCV prints its own warnings for corrupt files; ours is the one message the user should see.
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


def _decode(path: Path, data: bytes, flags: int) -> np.ndarray:
    # IMREAD_IGNORE_ORIENTATION is part of every flag set we pass (IMREAD_UNCHANGED implies it): orientation is
    # applied once, by _apply_orientation, from the header Pillow read, so all formats and reductions agree.
    try:
        with _quiet_opencv():
            array = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error:
        array = None
    if array is None or array.size == 0:
        raise ImageReadError(f"{path}: pixel data cannot be decoded: the file is corrupt or truncated ({_FIX_CORRUPT})")
    return array


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


def _to_uint8(array: np.ndarray, path: Path) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        # Full 16-bit range onto 8 bits (65535 -> 255); no per-image stretching, so colours stay comparable.
        return ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)
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
        colour = _to_unit_float(array[:, :, :-1], path)
        alpha = _to_unit_float(array[:, :, -1:], path)
        composite = colour * alpha + (1.0 - alpha)
        array = np.clip(composite * 255.0 + 0.5, 0, 255).astype(np.uint8)
        channels -= 1
    else:
        array = _to_uint8(array, path)
    if channels == 1:
        return cv2.cvtColor(array, cv2.COLOR_GRAY2RGB)
    if channels == 3:
        return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    raise ImageReadError(f"{path}: images with {channels} channels are not supported (save it as RGB or grayscale)")


def _reduction(long_side: int, max_side: int | None) -> int:
    """Largest JPEG decode reduction (1, 2, 4, 8) that still leaves at least ``max_side`` pixels on the long side."""
    if max_side is None:
        return 1
    factor = 1
    for candidate in (2, 4, 8):
        if long_side / candidate >= max_side:
            factor = candidate
    return factor


def _fit_max_side(image: np.ndarray, max_side: int) -> np.ndarray:
    height, width = image.shape[:2]
    if max(height, width) <= max_side:
        return image
    scale = max_side / max(height, width)
    new_width = max_side if width >= height else max(1, round(width * scale))
    new_height = max_side if height > width else max(1, round(height * scale))
    return cv2.resize(image, (new_width, new_height), interpolation=cv2.INTER_AREA)


def read_image(path: str | os.PathLike, max_side: int | None = None) -> np.ndarray:
    """Read an image as upright HxWx3 uint8 RGB, decoding it once.

    Grayscale, palette, RGBA (composited over white) and 16-bit images all become 8-bit RGB. With ``max_side`` an
    image whose longer side exceeds it is reduced, aspect kept, so its longer side equals ``max_side``; a JPEG is
    decoded directly at 1/2, 1/4 or 1/8 size (libjpeg's DCT scaling) and then area-resized, so a 6000x4000 photo never
    occupies full-size memory. Any unreadable file raises one :class:`ImageReadError` naming it.
    """
    path = Path(path)
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be a positive number of pixels or None, got {max_side}")
    data = _read_bytes(path)
    header = _header(path, data, verify=True)
    if header.format == "JPEG":
        factor = _reduction(max(header.height, header.width), max_side)
        array = _decode(path, data, _REDUCED_FLAGS[factor] | cv2.IMREAD_IGNORE_ORIENTATION)
        del data
        image = cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    else:
        array = _decode(path, data, cv2.IMREAD_UNCHANGED)
        del data
        image = _unchanged_to_rgb(array, path)
    del array
    image = _apply_orientation(image, header.orientation)
    if max_side is not None:
        image = _fit_max_side(image, max_side)
    return np.ascontiguousarray(image)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of the upright image, from the header alone (no pixel decode)."""
    path = Path(path)
    _check_file(path)
    header = _header(path, path)
    if header.orientation in (5, 6, 7, 8):
        return header.width, header.height
    return header.height, header.width


def read_mask(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a lesion mask as HxW uint8 in {0, 1} (pixel > 127 is lesion; the brightest channel of a colour mask counts).

    ``size`` is the (height, width) of the mask's image. A mask of another size with the same aspect ratio (within 1%;
    HAM10000 masks come at 3x their images' size) is resized with nearest neighbour; any other mismatch raises.
    """
    path = Path(path)
    data = _read_bytes(path)
    header = _header(path, data, verify=True)
    array = _decode(path, data, cv2.IMREAD_UNCHANGED)
    del data
    array = _to_uint8(array, path)
    if array.ndim == 3:
        # Alpha says nothing about the lesion; the colour channels do.
        colour = array[:, :, :3] if array.shape[2] >= 3 else array[:, :, :1]
        array = colour.max(axis=2)
    mask = (_apply_orientation(array, header.orientation) > 127).astype(np.uint8)
    if size is None or mask.shape == tuple(size):
        return mask
    height, width = int(size[0]), int(size[1])
    mask_height, mask_width = mask.shape
    image_aspect = width / height
    if abs(mask_width / mask_height - image_aspect) > 0.01 * image_aspect:
        raise ImageReadError(
            f"{path}: mask is {mask_height}x{mask_width} (HxW) but its image is {height}x{width} (HxW) and the aspect "
            "ratios differ (pair each image with its own mask)"
        )
    logger.debug("resizing mask %s from %dx%d to %dx%d", path, mask_height, mask_width, height, width)
    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)


def _is_mask_name(path: Path) -> bool:
    stem = path.stem.lower()
    return any(stem.endswith(suffix) for suffix in MASK_SUFFIXES)


def walk_files(root: str | os.PathLike, skip: Callable[[str], bool] = lambda name: name.startswith(".")) -> list[Path]:
    """Every file under ``root`` in a fixed order, following folder links once, leaving out names ``skip`` rejects."""
    found: list[Path] = []
    visited: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:  # a symlink loop would otherwise walk forever
            dirs[:] = []
            continue
        visited.add(real)
        dirs[:] = sorted(d for d in dirs if not skip(d))
        found.extend(Path(folder) / name for name in sorted(files) if not skip(name))
    return found


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder``, recursively and sorted, without hidden entries and mask files."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "no such folder"
        raise ImageReadError(f"{folder}: {what} (give the folder that holds the images)")
    images = (p for p in walk_files(folder) if p.suffix.lower() in IMAGE_EXTENSIONS and not _is_mask_name(p))
    return sorted(images)


def write_image(path: str | os.PathLike, image: np.ndarray, params: Sequence[int] = ()) -> Path:
    """Write an RGB (H x W x 3) or greyscale (H x W) uint8 image, atomically; the suffix picks the format and
    ``params`` are OpenCV's encoder flags (e.g. ``[cv2.IMWRITE_JPEG_QUALITY, 95]``)."""
    pixels = np.ascontiguousarray(image[..., ::-1] if image.ndim == 3 else image)

    def encode(tmp: Path) -> None:
        if not cv2.imwrite(str(tmp), pixels, list(params)):
            raise OSError(f"could not write {path}: is the folder writable and the suffix an image format?")

    return write_atomic(path, encode)
