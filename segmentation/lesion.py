"""From a lesion probability map to one lesion: largest component, holes filled, box with margin, square crop."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

FALLBACK_NO_LESION = "no lesion found"
FALLBACK_TOO_SMALL = "lesion implausibly small"
FALLBACK_ALL_BORDERS = "lesion touches every border"


@dataclass(frozen=True)
class LesionBox:
    """A lesion box in original pixels (x0, y0 inclusive; x1, y1 exclusive) and why it is the whole image, if so."""

    x0: int
    y0: int
    x1: int
    y1: int
    mask_area: float  # lesion area as a fraction of the image
    fallback: str = ""

    def as_text(self) -> str:
        return f"{self.x0} {self.y0} {self.x1} {self.y1}"


def clean_mask(mask: np.ndarray) -> np.ndarray:
    """Keep the largest connected component and fill its holes (one lesion per dermoscopy image)."""
    binary = mask.astype(bool)
    if not binary.any():
        return binary.astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return ndimage.binary_fill_holes(labels == largest).astype(np.uint8)


def centre_square(height: int, width: int) -> tuple[int, int, int, int]:
    side = min(height, width)
    x0, y0 = (width - side) // 2, (height - side) // 2
    return x0, y0, x0 + side, y0 + side


def lesion_box(mask: np.ndarray, margin: float = 0.1, min_area: float = 0.005) -> LesionBox:
    """The square box around the cleaned lesion mask, grown by ``margin`` of its side and kept inside the image.

    Falls back to the centre square of the whole image when no lesion is found, when it is smaller than
    ``min_area`` of the image, or when it touches all four borders (the U-Net then marked the skin, not a lesion).
    """
    h, w = mask.shape[:2]
    area = float(mask.sum()) / (h * w)
    reason = ""
    if area == 0:
        reason = FALLBACK_NO_LESION
    elif area < min_area:
        reason = FALLBACK_TOO_SMALL
    else:
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        if y0 == 0 and x0 == 0 and y1 == h and x1 == w:
            reason = FALLBACK_ALL_BORDERS
    if reason:
        return LesionBox(*centre_square(h, w), mask_area=area, fallback=reason)
    side = max(x1 - x0, y1 - y0)
    side = min(int(round(side * (1 + 2 * margin))), max(h, w))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    bx0 = int(round(cx - side / 2))
    by0 = int(round(cy - side / 2))
    # shift the square inside the image where it fits; a square larger than the short side is clipped there
    bx0 = min(max(bx0, 0), max(w - side, 0))
    by0 = min(max(by0, 0), max(h - side, 0))
    return LesionBox(bx0, by0, min(bx0 + side, w), min(by0 + side, h), mask_area=area)


def crop_to_lesion(image: np.ndarray, box: LesionBox, size: int) -> np.ndarray:
    """The box's pixels resized to ``size`` x ``size`` (a clipped box is padded by edge reflection to stay square)."""
    crop = image[box.y0 : box.y1, box.x0 : box.x1]
    ch, cw = crop.shape[:2]
    if ch != cw:
        side = max(ch, cw)
        top, left = (side - ch) // 2, (side - cw) // 2
        crop = cv2.copyMakeBorder(crop, top, side - ch - top, left, side - cw - left, cv2.BORDER_REFLECT_101)
    interp = cv2.INTER_AREA if crop.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interp)
