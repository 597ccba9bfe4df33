"""Class maps (``--map``, ``--drop``): built-in vocabulary conversions, map files and inline pairs."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from dermpipe.data.formats.ham10000 import HAM10000_CLASSES
from dermpipe.data.formats.isic import BINARY_CLASSES
from dermpipe.data.formats.layout import ConversionError, ConversionResult
from dermpipe.errors import did_you_mean, plain_message


@dataclass(frozen=True)
class ClassMap:
    """Source class -> target class; ``classes`` fixes the target order (built-in maps name the target vocabulary)."""

    pairs: dict[str, str]
    classes: tuple[str, ...] = ()
    strict_keys: bool = True


BUILTIN_MAPS: dict[str, ClassMap] = {
    "isic2019-ham10000": ClassMap(
        {"MEL": "mel", "NV": "nv", "BCC": "bcc", "AK": "akiec", "BKL": "bkl", "DF": "df", "VASC": "vasc"},
        HAM10000_CLASSES,
        strict_keys=False,
    ),
    "isic2018-ham10000": ClassMap(
        {"MEL": "mel", "NV": "nv", "BCC": "bcc", "AKIEC": "akiec", "BKL": "bkl", "DF": "df", "VASC": "vasc"},
        HAM10000_CLASSES,
        strict_keys=False,
    ),
    "isic2017-binary": ClassMap(
        {"melanoma": "malignant", "nevus": "benign", "seborrheic_keratosis": "benign"}, BINARY_CLASSES, False
    ),
    "ph2-binary": ClassMap(
        {"common_nevus": "benign", "atypical_nevus": "benign", "melanoma": "malignant"}, BINARY_CLASSES, False
    ),
}


def _map_from_file(path: Path) -> ClassMap:
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise ConversionError(f"cannot read class map {path}: {plain_message(error)}") from error
    classes: list[str] = []
    if isinstance(data, dict) and isinstance(data.get("map"), dict):
        classes = [str(c) for c in data.get("classes") or []]
        data = data["map"]
    if not isinstance(data, dict) or not all(isinstance(v, str) and v for v in data.values()):
        raise ConversionError(
            f"class map {path} must be a mapping SOURCE: TARGET (use --drop for a class to leave out), "
            "optionally under 'map:' with a 'classes:' list for the order"
        )
    return ClassMap({str(k): v for k, v in data.items()}, tuple(classes))


def parse_class_map(specs: Sequence[str]) -> ClassMap | None:
    """Merge ``--map`` values: a built-in map name, a ``.yaml``/``.json`` file, or ``A=x,B=y`` pairs (later wins)."""
    if not specs:
        return None
    pairs: dict[str, str] = {}
    classes: list[str] = []
    strict = False
    for spec in specs:
        for piece in [p.strip() for p in spec.split(",") if p.strip()] if "=" in spec else [spec.strip()]:
            if "=" in piece:
                source, _, target = (s.strip() for s in piece.partition("="))
                if not source or not target:
                    raise ConversionError(f"--map {piece!r}: write SOURCE=TARGET (use --drop for a class to leave out)")
                part = ClassMap({source: target})
            elif piece in BUILTIN_MAPS:
                part = BUILTIN_MAPS[piece]
            elif Path(piece).suffix.lower() in (".yaml", ".yml", ".json"):
                if not Path(piece).is_file():
                    raise ConversionError(f"class map file {piece} not found")
                part = _map_from_file(Path(piece))
            else:
                raise ConversionError(
                    f"unknown class map {piece!r}{did_you_mean(piece, BUILTIN_MAPS)}; built-in maps: "
                    f"{', '.join(BUILTIN_MAPS)}; or give SOURCE=TARGET pairs or a .yaml/.json file"
                )
            pairs |= part.pairs
            classes.extend(c for c in part.classes if c not in classes)
            strict = strict or part.strict_keys
    return ClassMap(pairs, tuple(classes), strict)


def apply_class_map(result: ConversionResult, class_map: ClassMap | None, drop: Sequence[str] = ()) -> ConversionResult:
    """Drop the named classes (counted), then rename every remaining class through the map; refuse unmapped classes.

    The original label stays in a ``source_label`` column, so a mapped manifest can always be traced back.
    """
    if class_map is None and not drop:
        return result
    report = result.report
    unknown_drop = [d for d in drop if d not in result.classes]
    if unknown_drop:
        raise ConversionError(
            f"--drop {', '.join(unknown_drop)}: not a class of this dataset ({', '.join(result.classes)})"
        )
    counts = Counter(r["label"] for r in result.rows if r["label"])
    kept_classes = [c for c in result.classes if c not in drop]
    pairs: dict[str, str] = {c: c for c in kept_classes}
    target_order: list[str] = list(kept_classes)
    if class_map is not None:
        unknown_keys = [k for k in class_map.pairs if k not in result.classes]
        if class_map.strict_keys and unknown_keys:
            raise ConversionError(
                f"--map names {', '.join(unknown_keys)}, which are not classes of this dataset "
                f"({', '.join(result.classes)}); class names are case-sensitive"
            )
        unmapped = [c for c in kept_classes if c not in class_map.pairs and counts[c]]
        if unmapped:
            which = ", ".join(f"{c} ({counts[c]} images)" for c in unmapped)
            example = ",".join(f"{c}=<class>" for c in unmapped)
            raise ConversionError(
                f"the class map leaves {which} unmapped: add --map {example} or --drop {' --drop '.join(unmapped)}"
            )
        unused = [c for c in kept_classes if c not in class_map.pairs]
        if unused:
            report.notes.append(f"classes without images and without a map entry left out: {', '.join(unused)}")
        pairs = {c: class_map.pairs[c] for c in kept_classes if c in class_map.pairs}
        target_order = list(class_map.classes)
        target_order.extend(t for t in pairs.values() if t not in target_order)
    rows: list[dict[str, str]] = []
    for row in result.rows:
        label = row["label"]
        if label in drop:
            report.dropped[label] = report.dropped.get(label, 0) + 1
            continue
        if class_map is not None:
            row = {**row, "label": pairs[label] if label else "", "source_label": label}
        rows.append(row)
    report.labelled = sum(1 for r in rows if r["label"])
    if class_map is not None:
        report.notes.append("class map: " + ", ".join(f"{s}->{t}" for s, t in pairs.items()))
    return ConversionResult(rows=rows, classes=tuple(target_order), report=report)
