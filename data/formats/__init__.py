"""Readers of the public dermoscopy layouts (ISIC 2016-2020, HAM10000, PH2, Derm7pt, class folders) into manifests."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from dermpipe.data.formats.class_folders import read_folder
from dermpipe.data.formats.class_maps import BUILTIN_MAPS, ClassMap, apply_class_map, parse_class_map
from dermpipe.data.formats.derm7pt import read_derm7pt
from dermpipe.data.formats.ham10000 import read_ham10000
from dermpipe.data.formats.isic import read_isic2016, read_isic2017, read_isic2018, read_isic2019, read_isic2020
from dermpipe.data.formats.layout import (
    ConversionError,
    ConversionReport,
    ConversionResult,
    require_root,
    resolve_splits,
)
from dermpipe.data.formats.ph2 import read_ph2
from dermpipe.data.manifest import Manifest
from dermpipe.data.splits import assign_folds
from dermpipe.errors import did_you_mean

__all__ = [
    "BUILTIN_MAPS",
    "FORMATS",
    "ClassMap",
    "ConversionError",
    "ConversionReport",
    "ConversionResult",
    "ReaderFn",
    "apply_class_map",
    "convert_dataset",
    "get_reader",
    "parse_class_map",
]

logger = logging.getLogger(__name__)

ReaderFn = Callable[[Path], ConversionResult]

FORMATS: dict[str, ReaderFn] = {
    "isic2016": read_isic2016,
    "isic2017": read_isic2017,
    "isic2018": read_isic2018,
    "isic2019": read_isic2019,
    "isic2020": read_isic2020,
    "ham10000": read_ham10000,
    "ph2": read_ph2,
    "derm7pt": read_derm7pt,
    "folder": read_folder,
}


def get_reader(name: str) -> ReaderFn:
    """The reader registered under ``name``; an unknown name lists the valid ones."""
    if name.lower() in FORMATS:
        return FORMATS[name.lower()]
    raise ConversionError(f"unknown format {name!r}{did_you_mean(name, FORMATS)}; valid formats: {', '.join(FORMATS)}")


def convert_dataset(
    fmt: str,
    root: str | os.PathLike,
    class_map: ClassMap | None = None,
    drop: Sequence[str] = (),
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    keep_official: bool = True,
    folds: int = 0,
) -> tuple[Manifest, ConversionReport]:
    """Read one dataset layout into a manifest: map classes, keep or make the split, optionally add K folds."""
    reader = get_reader(fmt)
    root = require_root(Path(root))
    result = apply_class_map(reader(root), class_map, drop)
    manifest = result.manifest()
    try:
        manifest = resolve_splits(manifest, fractions, seed, keep_official, result.report)
        if folds:
            manifest = assign_folds(manifest, folds, seed)
    except ValueError as error:  # ManifestError, or scikit-learn refusing more folds than a class has members
        raise ConversionError(
            f"cannot split {fmt} under {root}: {error} (try other --fractions or fewer --folds)"
        ) from error
    info = {
        "format": fmt,
        "root": str(root),
        "seed": seed,
        "fractions": list(fractions),
        "folds": folds,
        "class_map": dict(class_map.pairs) if class_map else {},
        "report": result.report.to_dict(),
    }
    logger.info("%s: %d images, %d labelled", fmt, result.report.images_found, result.report.labelled)
    return Manifest(rows=manifest.rows, classes=manifest.classes, info=info), result.report
