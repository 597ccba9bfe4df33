"""Synthetic dermoscopy images with exact lesion masks, class-dependent lesions and lesion groups, for offline tests."""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from dermpipe.data.manifest import Manifest, ManifestError
from dermpipe.data.splits import assign_splits
from dermpipe.errors import DermpipeError

logger = logging.getLogger(__name__)

DEFAULT_CLASSES: tuple[str, ...] = ("nv", "mel", "bkl", "bcc")
IMAGE_FORMATS: tuple[str, ...] = ("jpg", "png")

RGB = tuple[int, int, int]
Range = tuple[float, float]


class SyntheticDataError(DermpipeError):
    """Arguments that cannot make a synthetic data set."""


@dataclass(frozen=True)
class LesionProfile:
    """How a class looks: each image draws its lesion's traits uniformly from these ranges.

    Colours are RGB. ``body_dark``/``body_light`` bound the main lesion colour; ``opacity`` is how much the lesion
    hides the skin beneath (below 1 the skin shows through). ``asymmetry`` stretches one side of the outline,
    ``elongation`` makes it oval, ``border_irregularity`` adds high harmonics and fuzz to it, ``border_softness`` fades
    the rim inward (fraction of the radius). ``area`` is the lesion's share of the image. ``centre_darkening`` darkens
    the centre (< 0: a lighter, scar-like centre), ``colour_asymmetry`` one side. ``dot_colours`` paint ``dots``
    globules/nests/milia of relative size ``dot_size``; ``vessels`` counts red branching lines; ``veil`` is the
    strength of blue-white structureless patches, ``network`` of a pigment network, ``mottling`` of blotchy texture.
    """

    name: str
    body_dark: RGB
    body_light: RGB
    opacity: Range = (0.7, 0.95)
    centre_darkening: Range = (0.0, 0.2)
    colour_asymmetry: Range = (0.0, 0.1)
    asymmetry: Range = (0.0, 0.1)
    elongation: Range = (0.0, 0.15)
    border_irregularity: Range = (0.0, 0.03)
    border_softness: Range = (0.02, 0.08)
    area: Range = (0.1, 0.4)
    network: Range = (0.0, 0.0)
    mottling: Range = (0.03, 0.08)
    dot_colours: tuple[RGB, ...] = ()
    dots: tuple[int, int] = (0, 0)
    dot_size: Range = (0.03, 0.06)
    vessels: tuple[int, int] = (0, 0)
    veil: Range = (0.0, 0.0)


# Hand-made after the dermoscopic descriptions of the HAM10000 classes (Tschandl et al., Sci. Data 2018); the colour
# ranges overlap on purpose, so that colour alone does not give the class away.
_PROFILES: dict[str, LesionProfile] = {
    p.name: p
    for p in (
        LesionProfile(  # naevus: round, symmetric, even brown, regular network, a few brown globules
            "nv",
            body_dark=(100, 60, 42),
            body_light=(180, 122, 86),
            opacity=(0.75, 0.95),
            centre_darkening=(0.0, 0.25),
            colour_asymmetry=(0.0, 0.08),
            asymmetry=(0.0, 0.07),
            elongation=(0.0, 0.18),
            border_irregularity=(0.0, 0.025),
            border_softness=(0.03, 0.1),
            area=(0.1, 0.4),
            network=(0.15, 0.4),
            mottling=(0.03, 0.07),
            dot_colours=((95, 55, 35), (75, 45, 30)),
            dots=(0, 6),
            dot_size=(0.03, 0.06),
        ),
        LesionProfile(  # melanoma: darker, several colours, asymmetric, irregular border, blue-white veil
            "mel",
            body_dark=(60, 40, 36),
            body_light=(160, 104, 76),
            opacity=(0.8, 1.0),
            centre_darkening=(0.0, 0.3),
            colour_asymmetry=(0.15, 0.4),
            asymmetry=(0.12, 0.28),
            elongation=(0.05, 0.25),
            border_irregularity=(0.04, 0.09),
            border_softness=(0.03, 0.15),
            area=(0.2, 0.6),
            network=(0.15, 0.5),
            mottling=(0.1, 0.2),
            dot_colours=((30, 25, 28), (95, 100, 128), (165, 65, 65), (215, 200, 200), (45, 32, 30)),
            dots=(4, 14),
            dot_size=(0.03, 0.09),
            veil=(0.3, 0.7),
        ),
        LesionProfile(  # benign keratosis: light brown, waxy, sharp stuck-on border, milia cysts and comedo openings
            "bkl",
            body_dark=(112, 76, 60),
            body_light=(205, 154, 124),
            opacity=(0.65, 0.9),
            centre_darkening=(-0.05, 0.1),
            colour_asymmetry=(0.0, 0.15),
            asymmetry=(0.05, 0.15),
            elongation=(0.05, 0.3),
            border_irregularity=(0.02, 0.05),
            border_softness=(0.0, 0.04),
            area=(0.15, 0.5),
            network=(0.0, 0.08),
            mottling=(0.12, 0.22),
            dot_colours=((238, 228, 195), (225, 215, 175), (70, 50, 35)),
            dots=(4, 12),
            dot_size=(0.02, 0.05),
        ),
        LesionProfile(  # basal cell carcinoma: pink, translucent, blue-grey ovoid nests, arborising vessels
            "bcc",
            body_dark=(150, 100, 88),
            body_light=(222, 155, 150),
            opacity=(0.5, 0.8),
            centre_darkening=(0.0, 0.1),
            colour_asymmetry=(0.0, 0.15),
            asymmetry=(0.06, 0.18),
            elongation=(0.05, 0.25),
            border_irregularity=(0.02, 0.06),
            border_softness=(0.05, 0.15),
            area=(0.1, 0.45),
            mottling=(0.04, 0.1),
            dot_colours=((85, 95, 122), (62, 70, 96)),
            dots=(2, 8),
            dot_size=(0.05, 0.11),
            vessels=(2, 6),
        ),
        LesionProfile(  # actinic keratosis / intraepithelial carcinoma: red-pink, scaly white dots, dotted vessels
            "akiec",
            body_dark=(165, 88, 80),
            body_light=(218, 142, 128),
            opacity=(0.5, 0.8),
            colour_asymmetry=(0.0, 0.2),
            asymmetry=(0.05, 0.15),
            elongation=(0.05, 0.3),
            border_irregularity=(0.02, 0.06),
            border_softness=(0.08, 0.2),
            area=(0.1, 0.4),
            mottling=(0.08, 0.16),
            dot_colours=((240, 232, 222), (175, 50, 55)),
            dots=(6, 16),
            dot_size=(0.02, 0.04),
            vessels=(0, 2),
        ),
        LesionProfile(  # dermatofibroma: small, light brown rim, white scar-like centre
            "df",
            body_dark=(130, 90, 70),
            body_light=(188, 138, 106),
            opacity=(0.6, 0.85),
            centre_darkening=(-0.45, -0.25),
            asymmetry=(0.0, 0.08),
            elongation=(0.0, 0.2),
            border_softness=(0.1, 0.25),
            area=(0.1, 0.25),
            network=(0.1, 0.25),
        ),
        LesionProfile(  # vascular lesion: red-purple lacunae
            "vasc",
            body_dark=(120, 30, 52),
            body_light=(205, 75, 95),
            opacity=(0.7, 0.95),
            asymmetry=(0.02, 0.1),
            elongation=(0.0, 0.2),
            border_irregularity=(0.01, 0.04),
            border_softness=(0.02, 0.08),
            area=(0.1, 0.35),
            mottling=(0.05, 0.1),
            dot_colours=((140, 28, 60), (88, 20, 48), (175, 45, 70)),
            dots=(5, 14),
            dot_size=(0.06, 0.12),
        ),
    )
}
# Other vocabularies for the same diagnoses (ISIC 2016/2017/2019 spellings).
_ALIASES: dict[str, str] = {
    "melanoma": "mel",
    "malignant": "mel",
    "nevus": "nv",
    "naevus": "nv",
    "benign": "nv",
    "seborrheic_keratosis": "bkl",
    "ak": "akiec",
}

# Colours a derived profile mixes its lesion body from: browns, pinks, reds, blue-greys.
_PALETTE: tuple[RGB, ...] = (
    (150, 95, 65),
    (80, 50, 40),
    (200, 130, 130),
    (170, 60, 70),
    (95, 100, 125),
    (190, 150, 110),
)
_DOT_PALETTE: tuple[RGB, ...] = ((30, 25, 28), (95, 100, 128), (165, 65, 65), (235, 225, 195), (80, 50, 35))
_SKIN_TONES: tuple[RGB, ...] = ((236, 200, 190), (240, 210, 196), (224, 184, 162), (212, 166, 140), (196, 150, 122))
_MIN_CONTRAST = 40.0  # RGB distance between skin and lesion after blending, so every mask edge is visible


def _stable_seed(text: str) -> int:
    # Python's hash() of a str changes between processes; a profile must not.
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def _derived_profile(name: str) -> LesionProfile:
    rng = np.random.default_rng(_stable_seed(name))

    def span(lo: float, hi: float, width: float) -> Range:
        start = float(rng.uniform(lo, hi - width))
        return (round(start, 3), round(start + width, 3))

    weights = rng.dirichlet(np.full(len(_PALETTE), 0.5))
    body = weights @ np.array(_PALETTE, dtype=float)
    lightness = rng.uniform(0.55, 0.8)
    dark = np.round(body * lightness).astype(int).tolist()
    light = np.minimum(255, np.round(body * (2 - lightness))).astype(int).tolist()
    n_dot_colours = int(rng.integers(0, 3))
    dot_colours = tuple(_DOT_PALETTE[int(i)] for i in rng.choice(len(_DOT_PALETTE), n_dot_colours, replace=False))
    dots_lo = int(rng.integers(0, 6)) if n_dot_colours else 0
    return LesionProfile(
        name=name,
        body_dark=(dark[0], dark[1], dark[2]),
        body_light=(light[0], light[1], light[2]),
        opacity=span(0.5, 1.0, 0.25),
        centre_darkening=span(-0.2, 0.3, 0.15),
        colour_asymmetry=span(0.0, 0.4, 0.15),
        asymmetry=span(0.0, 0.3, 0.1),
        elongation=span(0.0, 0.3, 0.15),
        border_irregularity=span(0.0, 0.09, 0.03),
        border_softness=span(0.0, 0.2, 0.06),
        area=span(0.1, 0.6, 0.25),
        network=span(0.0, 0.5, 0.2) if rng.random() < 0.5 else (0.0, 0.0),
        mottling=span(0.02, 0.2, 0.08),
        dot_colours=dot_colours,
        dots=(dots_lo, dots_lo + int(rng.integers(2, 10))) if n_dot_colours else (0, 0),
        dot_size=span(0.02, 0.12, 0.04),
        vessels=(0, int(rng.integers(1, 5))) if rng.random() < 0.3 else (0, 0),
        veil=span(0.0, 0.6, 0.3) if rng.random() < 0.3 else (0.0, 0.0),
    )


def class_profile(name: str) -> LesionProfile:
    """The look of class ``name``: hand-made for the HAM10000 classes, otherwise derived from the name itself."""
    if not name:
        raise SyntheticDataError("a class name must not be empty")
    key = _ALIASES.get(name.lower(), name.lower())
    if key in _PROFILES:
        known = _PROFILES[key]
        return known if known.name == name else replace(known, name=name)
    return _derived_profile(name)


@dataclass(frozen=True)
class _Lesion:
    """One lesion's fixed traits, shared by all its views; geometry in canonical pixels around ``origin``."""

    skin: np.ndarray  # (3,) float32 RGB of the surrounding skin
    polygon: np.ndarray  # (n, 2) outline relative to the lesion centre
    colour: np.ndarray  # (C, C, 3) float32 RGB field, painted wherever the polygon lands
    opacity: np.ndarray  # (C, C) float32
    origin: float  # canvas coordinate of the lesion centre
    centre: tuple[float, float]  # where views put it before their own shift, image pixels
    rim_softness: float  # pixels over which the rim fades inward


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


def _draw(rng: np.random.Generator, bounds: Range) -> float:
    return float(rng.uniform(*bounds))


def _outline(rng: np.random.Generator, profile: LesionProfile, n_points: int) -> np.ndarray:
    """Unit-scale polar radius r(theta) = 1 + harmonics: low ones shape and stretch it, high ones roughen it."""
    theta = np.linspace(0.0, 2 * np.pi, n_points, endpoint=False)
    asym = _draw(rng, profile.asymmetry)
    elong = _draw(rng, profile.elongation)
    irregular = _draw(rng, profile.border_irregularity)
    r = np.ones(n_points)
    r += asym * np.cos(theta - rng.uniform(0, 2 * np.pi))  # one side stretched
    r += 0.6 * asym * np.cos(3 * theta - rng.uniform(0, 2 * np.pi))
    r += elong * np.cos(2 * theta - rng.uniform(0, 2 * np.pi))
    for k in (3, 4):
        r += 0.25 * (elong + asym) * rng.uniform(0, 1) * np.cos(k * theta - rng.uniform(0, 2 * np.pi))
    k = np.arange(5, 25)[:, None]
    amplitude = irregular * rng.uniform(0.2, 1.0, (len(k), 1)) * (5.0 / k) ** 1.2
    r += (amplitude * np.cos(k * theta - rng.uniform(0, 2 * np.pi, (len(k), 1)))).sum(axis=0)
    # Fuzz: vertex noise without its highest frequencies, so the border is rough but not pixel noise.
    fuzz = np.fft.rfft(rng.standard_normal(n_points))
    fuzz[40:] = 0
    fuzz = np.fft.irfft(fuzz, n_points)
    r += 0.3 * irregular * fuzz / (fuzz.std() + 1e-9)
    r = np.maximum(r, 0.3)
    return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)


def _polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _fill(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The polygon rasterised at sub-pixel precision: this is both the painted region and the mask."""
    mask = np.zeros(shape, np.uint8)
    cv2.fillPoly(mask, [np.round(points * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return mask


def _pt(p: np.ndarray) -> tuple[int, int]:
    return int(round(float(p[0]))), int(round(float(p[1])))


def _point_inside(rng: np.random.Generator, polygon: np.ndarray, depth: float) -> np.ndarray:
    """A random point within ``depth`` of the way from the centre to the outline."""
    return polygon[int(rng.integers(len(polygon)))] * np.sqrt(rng.uniform(0, 1)) * depth


def _skin_tone(rng: np.random.Generator) -> np.ndarray:
    tone = np.array(_SKIN_TONES[int(rng.integers(len(_SKIN_TONES)))], dtype=np.float64)
    return np.clip(tone * rng.uniform(0.96, 1.03, 3) + rng.normal(0, 3, 3), 0, 255).astype(np.float32)


def _body_colour(rng: np.random.Generator, profile: LesionProfile, skin: np.ndarray, opacity: float) -> np.ndarray:
    """A point between the class's dark and light colours, pushed away from the skin if too close to it."""
    t = rng.uniform()
    body = np.array(profile.body_dark) * (1 - t) + np.array(profile.body_light) * t + rng.normal(0, 5, 3)
    need = _MIN_CONTRAST / opacity  # the skin shows through a translucent lesion
    skin = skin.astype(np.float64)
    if np.linalg.norm(body - skin) >= need:
        return body.clip(0, 255).astype(np.float32)
    # Away from the skin in the colour's own direction, or else darker (lighter may run out of range).
    for away in (body - skin, -skin):
        norm = float(np.linalg.norm(away))
        if norm > 1:
            pushed = np.clip(skin + away * (need / norm), 0, 255)
            if np.linalg.norm(pushed - skin) >= 0.95 * need:
                return pushed.astype(np.float32)
    return (skin * 0.6).astype(np.float32)


def _paint_dots(
    rng: np.random.Generator,
    colour: np.ndarray,
    profile: LesionProfile,
    polygon: np.ndarray,
    origin: float,
    radius: float,
    scale: float,
) -> np.ndarray:
    """Globules, nests, milia or lacunae: soft-edged ellipses of the class's dot colours."""
    n_dots = int(rng.integers(profile.dots[0], profile.dots[1] + 1)) if profile.dot_colours else 0
    if n_dots == 0:
        return colour
    # A layer of premultiplied colour plus coverage, blurred once for soft edges; a dot lets some lesion show through.
    layer = np.zeros((*colour.shape[:2], 4), np.float32)
    for _ in range(n_dots):
        dot = profile.dot_colours[int(rng.integers(len(profile.dot_colours)))]
        strength = rng.uniform(0.6, 0.95)
        centre = _pt(_point_inside(rng, polygon, 0.8) + origin)
        axes = _pt(np.maximum(radius * _draw(rng, profile.dot_size) * rng.uniform(0.7, 1.3, 2), 1.0))
        value = tuple(float(c) * strength for c in dot) + (strength,)
        cv2.ellipse(layer, centre, axes, rng.uniform(0, 180), 0, 360, value, -1, cv2.LINE_8)
    layer = cv2.GaussianBlur(layer, (0, 0), 0.6 * scale)
    return colour * (1 - layer[..., 3:]) + layer[..., :3]


def _draw_vessel(rng: np.random.Generator, colour: np.ndarray, start: np.ndarray, radius: float, scale: float) -> None:
    """An arborising vessel: a wiggly red line that forks once or twice."""
    red = (rng.uniform(150, 190), rng.uniform(35, 60), rng.uniform(45, 70))
    tips = [(start, rng.uniform(0, 2 * np.pi), 1.0)]
    for _ in range(int(rng.integers(1, 3)) + 1):
        new_tips = []
        for point, heading, width in tips:
            path = [point]
            step = radius * rng.uniform(0.04, 0.07)
            for _ in range(int(rng.integers(4, 9))):
                heading += rng.normal(0, 0.35)
                path.append(path[-1] + step * np.array([np.cos(heading), np.sin(heading)]))
            thickness = max(1, int(round(width * scale * 1.2)))
            cv2.polylines(
                colour, [np.round(np.array(path) * 16).astype(np.int32)], False, red, thickness, cv2.LINE_AA, shift=4
            )
            new_tips.extend((path[-1], heading + turn + rng.normal(0, 0.2), width * 0.7) for turn in (-0.6, 0.6))
        tips = new_tips


def _design_lesion(rng: np.random.Generator, profile: LesionProfile, size: int) -> _Lesion:
    scale = size / 128.0
    skin = _skin_tone(rng)
    unit = _outline(rng, profile, max(128, 2 * size))
    radius = float(np.sqrt(_draw(rng, profile.area) * size * size / _polygon_area(unit)))  # exact target area
    polygon = unit * radius
    extent = float(np.linalg.norm(polygon, axis=1).max())
    half = int(np.ceil(extent + 6 * scale)) + 2
    canvas = 2 * half + 1
    shape = (canvas, canvas)
    origin = float(half)
    depth = cv2.distanceTransform(_fill(polygon + origin, shape), cv2.DIST_L2, 3)
    depth /= max(float(depth.max()), 1.0)

    yy, xx = _grid(canvas)
    angle = rng.uniform(0, 2 * np.pi)
    across = np.clip(((xx - origin) * np.cos(angle) + (yy - origin) * np.sin(angle)) / radius, -1, 1)
    opacity_level = _draw(rng, profile.opacity)
    body = _body_colour(rng, profile, skin, opacity_level)
    shade = 1.0 - _draw(rng, profile.centre_darkening) * np.sqrt(depth)
    shade *= 1.0 - _draw(rng, profile.colour_asymmetry) * across
    # Blotches mostly change lightness; a little per-channel noise keeps them from looking flat.
    mottle = _draw(rng, profile.mottling)
    cells = max(3, int(canvas / (10 * scale)))
    noise = _smooth_noise(rng, shape, cells, 4)
    shade *= 1 + mottle * noise[..., 3]
    colour = (body * shade[..., None]) * (1 + 0.15 * mottle * noise[..., :3])

    network = _draw(rng, profile.network)
    if network > 0:
        lines = np.exp(-((_band_noise(rng, shape, rng.uniform(5, 8) * scale) / 0.45) ** 2))
        patchy = np.clip(0.6 + 0.6 * _smooth_noise(rng, shape, 4), 0, 1)  # networks fade out towards parts of the rim
        colour *= (1 - network * lines * patchy * (0.4 + 0.6 * np.clip(depth * 3, 0, 1)))[..., None]

    veil = _draw(rng, profile.veil)
    if veil > 0:
        # Drawn and blurred at a quarter of the resolution: it is a soft haze, and blurring is the costly part.
        small = np.zeros((canvas // 4 + 1, canvas // 4 + 1), np.float32)
        for _ in range(int(rng.integers(1, 3))):
            centre = _pt((_point_inside(rng, polygon, 0.6) + origin) / 4)
            cv2.circle(small, centre, int(radius * rng.uniform(0.25, 0.5) / 4), 1.0, -1, cv2.LINE_AA)
        small = cv2.GaussianBlur(small, (0, 0), 0.04 * radius + 0.25)
        blob = (cv2.resize(small, (canvas, canvas), interpolation=cv2.INTER_LINEAR) * veil)[..., None]
        colour = colour * (1 - blob) + np.array((125, 135, 165), np.float32) * blob

    colour = _paint_dots(rng, colour, profile, polygon, origin, radius, scale)
    for _ in range(int(rng.integers(profile.vessels[0], profile.vessels[1] + 1))):
        _draw_vessel(rng, colour, _point_inside(rng, polygon, 0.7) + origin, radius, scale)
    colour = cv2.GaussianBlur(colour, (0, 0), 0.5 * scale)
    opacity = opacity_level * np.clip(1 + 0.1 * _smooth_noise(rng, shape, 4), 0.85, 1.1)

    # Not always centred: small lesions roam further, large ones stay mostly inside the frame.
    roam = max(0.04 * size, 0.5 * size - 0.95 * extent)
    centre = (size / 2 + rng.uniform(-roam, roam), size / 2 + rng.uniform(-roam, roam))
    return _Lesion(
        skin=skin,
        polygon=polygon,
        colour=np.clip(colour, 0, 255),
        opacity=np.clip(opacity, 0, 1),
        origin=origin,
        centre=centre,
        rim_softness=max(0.8 * scale, _draw(rng, profile.border_softness) * radius),
    )


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


def _render_view(
    rng: np.random.Generator,
    lesion: _Lesion | None,
    skin_tone: np.ndarray,
    size: int,
    jitter: bool,
    hair: float,
    vignette: float,
    ruler: float,
) -> tuple[np.ndarray, np.ndarray]:
    scale = size / 128.0
    image = _skin(rng, skin_tone, size)
    mask = np.zeros((size, size), np.uint8)
    if lesion is not None:
        angle = np.deg2rad(rng.uniform(-20, 20)) if jitter else 0.0
        zoom = rng.uniform(0.9, 1.1) if jitter else 1.0
        centre = np.array(lesion.centre) + (rng.uniform(-0.05, 0.05, 2) * size if jitter else 0.0)
        rot = zoom * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        # Canvas -> image: x_image = rot @ (x_canvas - origin) + centre; the same map places polygon and colours.
        warp = np.hstack([rot, (centre - rot @ np.full(2, lesion.origin))[:, None]])
        mask = _fill(lesion.polygon @ rot.T + centre, (size, size))
        colour = cv2.warpAffine(
            lesion.colour, warp, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        opacity = cv2.warpAffine(
            lesion.opacity, warp, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        inside = mask.astype(np.float32)
        # The rim fades inward over the class's softness; outside the mask only a one-pixel anti-aliasing bleed.
        fade = np.clip(0.1 + cv2.GaussianBlur(inside, (0, 0), lesion.rim_softness * zoom), 0, 1)
        bleed = 0.7 * cv2.GaussianBlur(inside, (0, 0), 0.6 * scale)
        alpha = ((bleed + (fade - bleed) * inside) * opacity)[..., None]
        image = image + (colour - image) * alpha
    # Hair and ruler draw from their own streams, so switching them on leaves the rest of the view unchanged.
    hair_rng, ruler_rng = (np.random.default_rng(int(s)) for s in rng.integers(0, 2**63, size=2))
    if rng.random() < hair:
        _draw_hair(hair_rng, image, size)
    if rng.random() < ruler:
        _draw_ruler(ruler_rng, image, size)
    # Exposure, white balance and uneven lighting, then the optional round field of view and sensor noise.
    yy, xx = _grid(size)
    slope = rng.normal(0, 0.06 / size, 2).astype(np.float32)
    light = 1 + slope[0] * (xx - size / 2) + slope[1] * (yy - size / 2)
    if rng.random() < vignette:
        light = light * _vignette(rng, size)
    gain = (rng.uniform(0.94, 1.05) * rng.uniform(0.97, 1.03, 3)).astype(np.float32)
    image = image * (light[..., None] * gain) + rng.standard_normal((size, size, 1), dtype=np.float32) * 1.5
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), mask


def _check_sample_args(size: int, hair: float, vignette: float, ruler: float) -> None:
    if int(size) < 16:
        raise SyntheticDataError(f"image size {size} is too small: use at least 16 pixels")
    for name, p in (("hair", hair), ("vignette", vignette), ("ruler", ruler)):
        if not 0.0 <= p <= 1.0:
            raise SyntheticDataError(f"{name} is a probability per image, got {p}: use a value in [0, 1]")


def make_lesion_views(
    rng: np.random.Generator,
    label: str | None,
    n_views: int,
    size: int = 128,
    *,
    hair: float = 0.3,
    vignette: float = 0.5,
    ruler: float = 0.1,
    lesion: bool = True,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_views`` images of one lesion on the same skin, as several dermoscopy photos of one lesion id would be.

    The lesion keeps its outline, colours and structures; each view has its own small rotation (up to 20 degrees),
    shift, zoom (+-10%), lighting, hair, ruler and vignetting. Each item is (RGB uint8 HxWx3, mask uint8 HxW of
    0/1). ``label`` None draws a class from DEFAULT_CLASSES.
    """
    _check_sample_args(size, hair, vignette, ruler)
    if n_views < 1:
        raise SyntheticDataError(f"n_views must be at least 1, got {n_views}")
    if label is None:
        label = DEFAULT_CLASSES[int(rng.integers(len(DEFAULT_CLASSES)))]
    design = _design_lesion(rng, class_profile(label), size) if lesion else None
    tone = design.skin if design is not None else _skin_tone(rng)
    return [_render_view(rng, design, tone, size, i > 0, hair, vignette, ruler) for i in range(n_views)]


def make_sample(
    rng: np.random.Generator,
    label: str | None,
    size: int = 128,
    *,
    hair: float = 0.3,
    vignette: float = 0.5,
    ruler: float = 0.1,
    lesion: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic dermoscopy image and its exact lesion mask: (RGB uint8 HxWx3, mask uint8 HxW of 0/1).

    ``hair``, ``vignette`` and ``ruler`` are the chances that the image has each artefact; ``lesion=False`` gives
    skin only and an all-zero mask.
    """
    return make_lesion_views(rng, label, 1, size, hair=hair, vignette=vignette, ruler=ruler, lesion=lesion)[0]


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
    """Write an RGB image or a single-channel mask."""
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if image_format == "jpg" else []
    bgr = pixels[..., ::-1] if pixels.ndim == 3 else pixels
    if not cv2.imwrite(str(path), np.ascontiguousarray(bgr), params):
        raise SyntheticDataError(f"could not write {path}: is the folder writable?")


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
    _check_sample_args(size, hair, vignette, ruler)
    for name in classes:
        class_profile(name)

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a synthetic dermoscopy data set: images, masks, manifest.csv.")
    parser.add_argument("--out", required=True, help="folder to write images/, masks/ and manifest.csv into")
    parser.add_argument("--n", type=int, default=200, help="number of images (default 200)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    parser.add_argument(
        "--classes", default=",".join(DEFAULT_CLASSES), help="comma-separated class names, majority first"
    )
    parser.add_argument("--imbalance", type=float, default=4.0, help="most over least frequent class (default 4)")
    parser.add_argument(
        "--images-per-lesion", default="1,3", help="views per lesion id: low,high or one number (default 1,3)"
    )
    parser.add_argument("--hair", type=float, default=0.3, help="chance of hair per image (default 0.3)")
    parser.add_argument("--vignette", type=float, default=0.5, help="chance of dermatoscope vignetting (default 0.5)")
    parser.add_argument("--ruler", type=float, default=0.1, help="chance of ruler marks per image (default 0.1)")
    parser.add_argument("--format", choices=IMAGE_FORMATS, default="jpg", help="image file format (default jpg)")
    args = parser.parse_args(argv)
    try:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
        try:
            bounds = [int(v) for v in args.images_per_lesion.split(",")]
            lo, hi = bounds if len(bounds) == 2 else (bounds[0], bounds[0]) if len(bounds) == 1 else (0, -1)
        except ValueError:
            lo, hi = 0, -1
        if lo < 1 or hi < lo:
            raise SyntheticDataError(
                f"--images-per-lesion {args.images_per_lesion!r} must be one number or two like 1,3 (low <= high)"
            )
        path = generate_dataset(
            args.out,
            n_images=args.n,
            size=args.size,
            seed=args.seed,
            classes=classes,
            imbalance=args.imbalance,
            images_per_lesion=(lo, hi),
            hair=args.hair,
            vignette=args.vignette,
            ruler=args.ruler,
            image_format=args.format,
        )
    except (SyntheticDataError, ManifestError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    manifest = Manifest.read(path)
    counts = ", ".join(f"{name} {n}" for name, n in manifest.class_counts().items())
    n_lesions = len({r["group"] for r in manifest.rows})
    print(f"wrote {len(manifest)} images of {n_lesions} lesions ({counts}) to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
