"""Class profiles for the synthetic generator: hand-made HAM10000 looks and stable looks derived from any name."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np

from dermpipe.errors import DermpipeError

DEFAULT_CLASSES: tuple[str, ...] = ("nv", "mel", "bkl", "bcc")

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
