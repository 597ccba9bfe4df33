"""The training augmentation's settings: kept apart from the albumentations pipeline (``data/augment.py``) so that
reading a config, as prediction does, never imports albumentations."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation; every ``*_p`` is the probability that step runs on an image (0 leaves it out)."""

    enabled: bool = True
    hflip: float = 0.5
    vflip: float = 0.5
    rotate_limit: int = 180  # degrees either way; dermoscopy has no "up"
    rotate_p: float = 0.5
    scale_limit: float = 0.1  # zoom by a factor in [1 - limit, 1 + limit]
    shift_limit: float = 0.05  # translate by up to this fraction of the side
    affine_p: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.05  # fraction of the hue circle, at most 0.5
    colour_p: float = 0.5
    blur_p: float = 0.1
    sharpen_p: float = 0.1
    synthetic_hair_p: float = 0.0

    def __post_init__(self) -> None:
        for item in fields(self):
            if item.name.endswith("_p") or item.name in ("hflip", "vflip"):
                value = getattr(self, item.name)
                if not 0.0 <= value <= 1.0:
                    raise ValueError(f"augment setting {item.name} is a probability in [0, 1], got {value}")
        for name in ("scale_limit", "shift_limit", "brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"augment setting {name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"augment setting hue must be in [0, 0.5], got {self.hue}")
        if not 0 <= self.rotate_limit <= 180:
            raise ValueError(f"augment setting rotate_limit must be 0..180 degrees, got {self.rotate_limit}")
