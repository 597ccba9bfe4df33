"""Robust image and mask reading: JPEG/PNG/BMP/TIFF, EXIF orientation, any bit depth to 8-bit RGB, early reduction.

Every reader looks at a file with ``os.stat`` before it opens it: a named pipe, a device, a socket or a link to one is
refused unopened (opening a FIFO blocks forever, reading ``/dev/zero`` never ends), and so is a file over
``MAX_FILE_BYTES``; an image whose decoded pixels would take more than ``MAX_DECODED_BYTES`` is refused from its
header, before any pixel is decoded.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import stat
import struct
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from dermpipe.data.pixels import ImageReadError, ImageTooLargeError, _apply_orientation, _to_uint8, _unchanged_to_rgb
from dermpipe.engine.files import OutputPathError, write_atomic

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
# Name endings of mask files that sit beside their images (ISIC *_segmentation / *_Segmentation, PH2 *_lesion) and
# of the ISIC 2017 superpixel maps, which are not photographs either.
MASK_SUFFIXES: tuple[str, ...] = ("_segmentation", "_lesion", "_superpixels")
TAKEN_FORMATS = "JPEG (.jpg, .jpeg), PNG (.png), BMP (.bmp), TIFF (.tif, .tiff)"
# Bounds on one input file: the largest dermatoscope or camera photo is a few tens of MiB and megapixels.
MAX_FILE_BYTES: int = 512 * 2**20
# The bound on one image's decoded pixels, in bytes: width x height x channels x bytes per sample as the decoder
# returns them, or the 8-bit RGB image made from them where that is larger. 150 megapixels of 8-bit RGB, below
# Pillow's own decompression-bomb refusal (2 x Image.MAX_IMAGE_PIXELS, about 179 Mpx), so ours speaks first; a
# 16-bit RGBA image (8 bytes a pixel) meets it at 56 megapixels.
MAX_DECODED_BYTES: int = 150_000_000 * 3
# Formats people photograph or export in that the reader does not take, by suffix: named in the reason.
_OTHER_FORMATS: dict[str, str] = {
    **{f".{name.lower()}": name for name in ("GIF", "WebP", "HEIC", "HEIF", "AVIF", "SVG", "PDF")},
    **{f".{raw}": f"camera raw (.{raw})" for raw in ("dng", "cr2", "cr3", "nef", "arw", "orf", "raf")},
    ".jp2": "JPEG 2000",
    ".jxl": "JPEG XL",
    ".dcm": "DICOM",
}

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


@dataclass(frozen=True)
class _Header:
    format: str  # JPEG, PNG, BMP or TIFF
    height: int  # as stored, before EXIF orientation
    width: int
    orientation: int  # EXIF orientation 1..8 (1 = as stored)


def _size_text(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))  # fmt: skip
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def file_problem(path: str | os.PathLike) -> tuple[str, os.stat_result | None]:
    """Why a reader would refuse ``path`` from ``os.stat`` alone (the file is never opened), or ``""``; and its stat.

    The reason has the form ``<what is wrong> (<fix>)``: missing, a broken link or a link loop, a folder, a FIFO,
    device or socket (or a link to one), empty, or over ``MAX_FILE_BYTES``.
    """
    path = Path(path)
    try:
        st = os.stat(path)  # follows links: a link to /dev/zero is a character device
    except FileNotFoundError:
        if os.path.islink(path):
            return f"broken link: it points to {os.readlink(path)}, which does not exist (fix or remove the link)", None
        return "no such file (check the path and the manifest's image_path/mask_path)", None
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "symbolic link loop: the link never reaches a file (fix or remove the link)", None
        return f"cannot be inspected: {error.strerror or error} (check its permissions)", None
    if stat.S_ISDIR(st.st_mode):
        return "is a folder, not an image file (point to the image file itself)", st
    if not stat.S_ISREG(st.st_mode):
        via = f" (via a link to {os.path.realpath(path)})" if os.path.islink(path) else ""
        return f"is {_kind(st.st_mode)}{via}, not an image file: not opened (point to a regular image file)", st
    if st.st_size == 0:
        return f"file is empty (0 bytes) ({_FIX_CORRUPT})", st
    if st.st_size > MAX_FILE_BYTES:
        return (
            f"file is {_size_text(st.st_size)}, over the {_size_text(MAX_FILE_BYTES)} bound on one image file "
            "(downscale or re-export it; the bound is dermpipe.data.reading.MAX_FILE_BYTES)"
        ), st
    return "", st


def _check_file(path: Path) -> None:
    problem, _ = file_problem(path)
    if problem:
        raise ImageReadError(f"{path}: {problem}")


def _open_regular(path: Path) -> BinaryIO:
    """Open a file that ``_check_file`` passed; non-blocking, and checked again on the open descriptor, so a file
    swapped for a FIFO in between can neither block the open nor be read."""
    _check_file(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as error:
        raise ImageReadError(f"{path}: cannot be read: {error.strerror or error} (check its permissions)") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ImageReadError(f"{path}: is {_kind(mode)}, not an image file (point to a regular image file)")
    return os.fdopen(fd, "rb")


def _read_bytes(path: Path) -> bytes:
    with _open_regular(path) as f:
        try:
            data = f.read(MAX_FILE_BYTES + 1)
        except OSError as error:
            raise ImageReadError(f"{path}: cannot be read: {error.strerror or error} (check its permissions)") from None
    if not data:
        raise ImageReadError(f"{path}: file is empty (0 bytes) ({_FIX_CORRUPT})")
    if len(data) > MAX_FILE_BYTES:  # it grew after the check
        raise ImageReadError(f"{path}: file is over the {_size_text(MAX_FILE_BYTES)} bound on one image file "
                             "(downscale or re-export it)")  # fmt: skip
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


def _decoded_layout(image: Image.Image) -> tuple[int, int]:
    """(channels, bytes per sample) of the pixels the decoder returns for ``image``, from its header: Pillow's bands
    (a palette expands to colour, plus alpha with transparency; grey+alpha to four channels, as OpenCV decodes it),
    and the sample depth of its raw mode (``RGBA;16B``: 2 bytes; ``I``, ``F``: 4)."""
    mode = image.mode
    channels = {"P": 4 if "transparency" in image.info else 3, "LA": 4, "PA": 4}.get(mode, len(image.getbands()))
    raw = ""
    if image.tile:
        args = image.tile[0][3]
        raw = str(args[0] if isinstance(args, tuple) and args else args)
    if mode in ("I", "F") or ";32" in raw:
        return channels, 4
    return channels, 2 if ";16" in raw or mode.startswith("I;16") else 1


def decoded_bytes(width: int, height: int, channels: int, sample_bytes: int) -> int:
    """What decoding an image takes, as ``MAX_DECODED_BYTES`` counts it: its samples, or the 8-bit RGB image made from
    them where that is larger."""
    return width * height * max(channels * sample_bytes, 3)


def _megabytes(n: int) -> str:
    """``n`` bytes as a bound on decoded pixels is stated: 450 MB, 1,152 MB; below a megabyte, 30,000 bytes."""
    return f"{n / 1e6:,.0f} MB" if n >= 1e6 else f"{n:,} bytes"


def _header(path: Path, source: BinaryIO | bytes, verify: bool = False) -> _Header:
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
            channels, sample_bytes = _decoded_layout(image)
            size = decoded_bytes(width, height, channels, sample_bytes)
            too_large = size > MAX_DECODED_BYTES  # the header alone says it: nothing more is read
            orientation = 1 if too_large else _orientation(image)
            if verify and image_format == "PNG" and not too_large:
                image.verify()
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(
            f"{path}: image is too large to decode safely: {str(error).rstrip('.')} (a decompression bomb, or a scan "
            f"to downscale below {MAX_DECODED_BYTES / 3e6:g} megapixels first)"
        ) from None
    except UnidentifiedImageError:
        raise ImageReadError(
            f"{path}: not a readable image: unknown format or corrupt header ({_FIX_CORRUPT}; supported: JPEG, PNG, "
            "BMP, TIFF)"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as error:
        raise ImageReadError(f"{path}: corrupt or truncated image file: {error} ({_FIX_CORRUPT})") from None
    if too_large:
        raise ImageTooLargeError(
            f"{path}: image is {width}x{height} pixels ({width * height / 1e6:.0f} megapixels) of {channels} "
            f"channel(s) x {8 * sample_bytes} bits: {_megabytes(size)} decoded, over the "
            f"{_megabytes(MAX_DECODED_BYTES)} bound on decoded pixels ({MAX_DECODED_BYTES / 3e6:g} megapixels of "
            "8-bit RGB; a decompression bomb, or a scan to downscale first; the bound is "
            "dermpipe.data.reading.MAX_DECODED_BYTES)"
        )
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
    with _open_regular(path) as f:
        header = _header(path, f)
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


def write_image(path: str | os.PathLike, image: np.ndarray, params: Sequence[int] = ()) -> Path:
    """Write an RGB (H x W x 3) or greyscale (H x W) uint8 image, atomically; the suffix picks the format and
    ``params`` are OpenCV's encoder flags (e.g. ``[cv2.IMWRITE_JPEG_QUALITY, 95]``)."""
    pixels = np.ascontiguousarray(image[..., ::-1] if image.ndim == 3 else image)

    def encode(tmp: Path) -> None:
        if not cv2.imwrite(str(tmp), pixels, list(params)):  # False on a full or read-only disk, too
            raise OutputPathError(f"could not write {path}: is the disk full or read-only, or not an image suffix?")

    return write_atomic(path, encode)
