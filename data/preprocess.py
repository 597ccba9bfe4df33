"""Dermoscopy preprocessing: Shades of Gray colour constancy (Finlayson & Trezzi 2004), DullRazor (Lee et al. 1997)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreprocessConfig:
    """Which preprocessing steps run, in this order: colour constancy, then hair removal. Both off by default."""

    colour_constancy: bool = False
    shades_of_gray_p: int = 6  # Minkowski norm; 1 = grey world, large = max-RGB
    hair_removal: bool = False
    hair_kernel: int = 17  # cross-shaped structuring element side, in pixels; wider than a hair, narrower than a lesion
    hair_threshold: int = 10  # black-hat response (grey levels) above which a pixel counts as hair

    def __post_init__(self) -> None:
        if self.shades_of_gray_p < 1:
            raise ValueError(f"preprocess setting shades_of_gray_p must be >= 1, got {self.shades_of_gray_p}")
        if self.hair_kernel < 3:
            raise ValueError(f"preprocess setting hair_kernel must be >= 3 pixels, got {self.hair_kernel}")
        if not 0 <= self.hair_threshold <= 255:
            raise ValueError(f"preprocess setting hair_threshold must be in 0..255, got {self.hair_threshold}")


def _check_rgb(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {image.shape} and dtype {image.dtype}")


def shades_of_gray(image: np.ndarray, p: int = 6) -> np.ndarray:
    """Remove the illuminant's colour cast: scale each channel so the channels' Minkowski p-norms become equal.

    The illuminant is estimated as ``(mean(I_c ** p)) ** (1/p)`` per channel (Finlayson & Trezzi 2004), normalised to
    unit length, and divided out with the factor ``sqrt(3)`` so a neutral grey image is left unchanged.
    """
    _check_rgb(image)
    if p < 1:
        raise ValueError(f"shades of gray p must be >= 1, got {p}")
    # Working in [0, 1] keeps I ** p inside float range for any p.
    unit = image.astype(np.float64) / 255.0
    illuminant = np.power(np.mean(np.power(unit, p), axis=(0, 1)), 1.0 / p)
    norm = float(np.linalg.norm(illuminant))
    if norm == 0.0 or not np.all(illuminant > 0):
        return image.copy()  # a black channel carries no illuminant estimate: leave the image as it is
    gains = 1.0 / (illuminant / norm * np.sqrt(3.0))
    return np.clip(image.astype(np.float32) * gains.astype(np.float32), 0, 255).round().astype(np.uint8)


def hair_mask(image: np.ndarray, kernel_size: int = 17, threshold: int = 10) -> np.ndarray:
    """HxW uint8 mask (255 = hair): thin dark structures found by a grayscale black-hat with a cross-shaped kernel."""
    _check_rgb(image)
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    kernel = cv2.getStructuringElement(cv2.MORPH_CROSS, (kernel_size, kernel_size))
    black_hat = cv2.morphologyEx(gray, cv2.MORPH_BLACKHAT, kernel)
    _, mask = cv2.threshold(black_hat, threshold, 255, cv2.THRESH_BINARY)
    # Anti-aliased hair edges respond below the threshold; grow the mask a pixel so they are painted over as well.
    return cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))


def remove_hair(image: np.ndarray, kernel_size: int = 17, threshold: int = 10) -> np.ndarray:
    """DullRazor-style hair removal (Lee et al. 1997): find hair with a black-hat filter, fill it by Telea inpainting.

    A dark region wider than the kernel (the lesion itself) survives the closing and is left alone.
    """
    mask = hair_mask(image, kernel_size, threshold)
    if not mask.any():
        return image.copy()
    return cv2.inpaint(image, mask, inpaintRadius=3, flags=cv2.INPAINT_TELEA)


def preprocess(image: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Apply the enabled steps in order (colour constancy, hair removal); with none enabled return ``image`` itself."""
    if cfg.colour_constancy:
        image = shades_of_gray(image, cfg.shades_of_gray_p)
    if cfg.hair_removal:
        image = remove_hair(image, cfg.hair_kernel, cfg.hair_threshold)
    return image
