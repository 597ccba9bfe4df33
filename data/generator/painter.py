"""Painting synthetic dermoscopy pixels: skin, lesion design, dots, vessels, hair, ruler, vignette and views."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from dermpipe.data.generator.artefacts import (
    _band_noise,
    _draw_hair,
    _draw_ruler,
    _grid,
    _skin,
    _smooth_noise,
    _vignette,
)
from dermpipe.data.generator.profiles import (
    DEFAULT_CLASSES,
    RGB,
    LesionProfile,
    Range,
    SyntheticDataError,
    class_profile,
)

_SKIN_TONES: tuple[RGB, ...] = ((236, 200, 190), (240, 210, 196), (224, 184, 162), (212, 166, 140), (196, 150, 122))
_MIN_CONTRAST = 40.0  # RGB distance between skin and lesion after blending, so every mask edge is visible


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


def check_sample_args(size: int, hair: float, vignette: float, ruler: float) -> None:
    """Raise SyntheticDataError for an image side under 16 pixels or an artefact chance outside [0, 1]."""
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
    check_sample_args(size, hair, vignette, ruler)
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
