"""Readers of the public dermoscopy layouts (ISIC 2016-2020, HAM10000, PH2, Derm7pt, class folders) into manifests."""

from __future__ import annotations

import csv
import difflib
import io
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dermpipe.data.manifest import SPLITS, Manifest
from dermpipe.data.reading import IMAGE_EXTENSIONS, walk_files
from dermpipe.data.splits import assign_folds, assign_splits
from dermpipe.errors import DermpipeError

logger = logging.getLogger(__name__)

HAM10000_CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
ISIC2018_CLASSES: tuple[str, ...] = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
ISIC2019_CLASSES: tuple[str, ...] = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
ISIC2017_CLASSES: tuple[str, ...] = ("melanoma", "nevus", "seborrheic_keratosis")
BINARY_CLASSES: tuple[str, ...] = ("benign", "malignant")
PH2_CLASSES: tuple[str, ...] = ("common_nevus", "atypical_nevus", "melanoma")

# `_downsampled` marks ISIC 2019 images that were shrunk; the id is the same lesion image.
ISIC_IMAGE = re.compile(r"^(ISIC_\d+)(?:_downsampled)?\.(?:jpe?g|png|bmp|tiff?)$", re.IGNORECASE)
ISIC_MASK = re.compile(r"^(ISIC_\d+)(?:_downsampled)?_segmentation\.png$", re.IGNORECASE)
ISIC_ID = re.compile(r"^(ISIC_\d+)(?:_downsampled)?$", re.IGNORECASE)
_SPLIT_WORDS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
_MISSING_VALUES = {"", "unknown", "nan", "na", "n/a", "none", "null"}
_TABLE_SUFFIXES = (".csv", ".tab", ".tsv")


class ConversionError(DermpipeError):
    """A dataset layout, class map or option the converter cannot use; the message names the thing and the fix."""


@dataclass
class ConversionReport:
    """What a converter found, and every problem it counted instead of silently dropping."""

    images_found: int = 0
    labelled: int = 0
    masks_found: int = 0
    unlabelled: list[str] = field(default_factory=list)
    bad_labels: list[str] = field(default_factory=list)
    labels_without_images: list[str] = field(default_factory=list)
    missing_masks: list[str] = field(default_factory=list)
    masks_without_images: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "images": self.images_found,
            "labelled": self.labelled,
            "masks": self.masks_found,
            "unlabelled": len(self.unlabelled),
            "bad_labels": len(self.bad_labels),
            "labels_without_images": len(self.labels_without_images),
            "missing_masks": len(self.missing_masks),
            "masks_without_images": len(self.masks_without_images),
            "duplicates": len(self.duplicates),
            "dropped": sum(self.dropped.values()),
        }

    def to_dict(self) -> dict:
        """Counts, notes and the full id lists, for the manifest's JSON sidecar."""
        lists = {
            name: list(getattr(self, name))
            for name in (
                "unlabelled",
                "bad_labels",
                "labels_without_images",
                "missing_masks",
                "masks_without_images",
                "duplicates",
            )
        }
        return {"counts": self.counts(), "dropped": dict(self.dropped), "notes": list(self.notes), "ids": lists}

    def describe(self, examples: int = 5) -> list[str]:
        """Human-readable lines: one per non-zero problem (with a few example ids), then the notes."""
        lines = []
        titles = {
            "unlabelled": "images without a label (kept, empty label)",
            "bad_labels": "label rows that name no single class (image kept unlabelled)",
            "labels_without_images": "labels without an image (not in the manifest)",
            "missing_masks": "images without a mask",
            "masks_without_images": "masks without an image",
            "duplicates": "duplicate files (an earlier file has the same id; skipped)",
        }
        for name, title in titles.items():
            ids = getattr(self, name)
            if ids:
                shown = ", ".join(ids[:examples]) + (", ..." if len(ids) > examples else "")
                lines.append(f"{title}: {len(ids)} ({shown})")
        for name, n in self.dropped.items():
            lines.append(f"dropped by --drop {name}: {n}")
        lines.extend(f"note: {note}" for note in self.notes)
        return lines


@dataclass
class ConversionResult:
    """Manifest rows, the class vocabulary in the dataset's own order, and the report of what was found."""

    rows: list[dict[str, str]]
    classes: tuple[str, ...]
    report: ConversionReport

    def manifest(self, info: dict | None = None) -> Manifest:
        return Manifest(rows=tuple(self.rows), classes=self.classes, info=dict(info or {}))


# ---------------------------------------------------------------------------------------------------------------------
# Finding files


def _skipped(name: str) -> bool:
    # Zip archives made on macOS carry __MACOSX/ and ._name resource forks that look like images by name.
    return name.startswith(".") or name == "__MACOSX"


def scan_files(root: Path) -> list[Path]:
    """Every file under ``root`` in a fixed order, following folder links once, without hidden entries."""
    return walk_files(root, _skipped)


def official_split(path: Path, root: Path, include_name: bool = False) -> str:
    """train/val/test when a folder (or the file name) under ``root`` says so, e.g. ``ISIC-2017_Validation_Data``."""
    rel = path.relative_to(root)
    parts = list(rel.parts[:-1]) + ([rel.stem] if include_name else [])
    for part in reversed(parts):  # the deepest folder that names a split wins
        for word in re.split(r"[^a-z0-9]+", part.lower()):
            if word in _SPLIT_WORDS:
                return _SPLIT_WORDS[word]
    return ""


def _clean(value: str | None) -> str:
    value = (value or "").strip()
    return "" if value.lower() in _MISSING_VALUES else value


def read_table(path: Path) -> list[list[str]]:
    """Rows of a CSV or tab-separated file (the delimiter is guessed from the first line), blank rows skipped."""
    try:
        text = path.read_text(encoding="utf-8-sig", errors="replace")
    except OSError as error:
        raise ConversionError(f"cannot read {path}: {error.strerror}") from error
    first = text.split("\n", 1)[0]
    delimiter = "\t" if first.count("\t") > first.count(",") else ","
    return [[c.strip() for c in row] for row in csv.reader(io.StringIO(text), delimiter=delimiter) if any(row)]


def read_records(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Lower-cased header and one dict per data row of a table with a header."""
    rows = read_table(path)
    if not rows:
        return [], []
    header = [h.lower() for h in rows[0]]
    return header, [dict(zip(header, row)) for row in rows[1:]]


def _tables(files: Iterable[Path]) -> list[Path]:
    return [f for f in files if f.suffix.lower() in _TABLE_SUFFIXES]


def _header(path: Path) -> set[str]:
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            first = f.readline()
    except OSError:
        return set()
    delimiter = "\t" if first.count("\t") > first.count(",") else ","
    return {c.strip().strip('"').lower() for c in first.split(delimiter)}


def isic_id(name: str) -> str | None:
    """``ISIC_0000000`` from ``ISIC_0000000``, ``ISIC_0000000_downsampled`` or an image file name; else None."""
    match = ISIC_ID.match(name.strip()) or ISIC_IMAGE.match(name.strip())
    return match.group(1) if match else None


def _one_hot(record: dict[str, str], columns: Sequence[str], names: Sequence[str]) -> tuple[str | None, int]:
    """The class whose column holds 1 (floats like ``1.0`` allowed) and the number of 1s; None when not exactly one."""
    hits: list[str] = []
    for column, name in zip(columns, names):
        try:
            value = float(record.get(column, ""))
        except ValueError:
            return None, -1
        if value == 1.0:
            hits.append(name)
        elif value != 0.0:
            return None, -1
    return (hits[0] if len(hits) == 1 else None), len(hits)


# ---------------------------------------------------------------------------------------------------------------------
# Assembling rows


@dataclass
class _Layout:
    """What a reader collected, keyed by image id, before it becomes rows."""

    root: Path
    images: dict[str, Path] = field(default_factory=dict)
    masks: dict[str, Path] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    bad: dict[str, str] = field(default_factory=dict)
    splits: dict[str, str] = field(default_factory=dict)
    label_splits: dict[str, str] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)
    report: ConversionReport = field(default_factory=ConversionReport)

    def add_image(self, image_id: str, path: Path, split: str = "") -> None:
        if image_id in self.images:
            self.report.duplicates.append(str(path.relative_to(self.root)))
            return
        self.images[image_id] = path
        if split:
            self.splits[image_id] = split

    def add_mask(self, image_id: str, path: Path) -> None:
        if image_id in self.masks:
            self.report.duplicates.append(str(path.relative_to(self.root)))
            return
        self.masks[image_id] = path

    def add_label(self, image_id: str, label: str | None, source: Path, problem: str = "") -> None:
        """Record a label (None: the row names no single class); a second, different label for one id is a conflict."""
        split = official_split(source, self.root, include_name=True)
        if split:
            self.label_splits.setdefault(image_id, split)
        if label is None:
            self.bad.setdefault(image_id, problem or f"unusable label row in {source.name}")
            return
        previous = self.labels.setdefault(image_id, label)
        if previous != label:
            self.bad[image_id] = f"labels {previous!r} and {label!r} disagree"

    def add_metadata(self, image_id: str, values: dict[str, str | None]) -> None:
        entry = self.metadata.setdefault(image_id, {})
        for key, value in values.items():
            value = _clean(value)
            if value and not entry.get(key):
                entry[key] = value

    def collect_isic_files(self, files: Iterable[Path]) -> None:
        for path in files:
            if mask := ISIC_MASK.match(path.name):
                self.add_mask(mask.group(1), path)
            elif image := ISIC_IMAGE.match(path.name):
                self.add_image(image.group(1), path, official_split(path, self.root))

    def finish(self, classes: Sequence[str], what: str) -> ConversionResult:
        if not self.images:
            raise ConversionError(f"no {what} images found under {self.root}: is --root the folder you unzipped into?")
        report = self.report
        report.images_found = len(self.images)
        report.masks_found = len(self.masks)
        rows: list[dict[str, str]] = []
        for image_id in sorted(self.images):
            label = "" if image_id in self.bad else self.labels.get(image_id, "")
            if image_id in self.bad:
                report.bad_labels.append(f"{image_id} ({self.bad[image_id]})")
            elif not label:
                report.unlabelled.append(image_id)
            mask = self.masks.get(image_id)
            if self.masks and mask is None:
                report.missing_masks.append(image_id)
            row = {
                "image_id": image_id,
                "image_path": os.path.abspath(self.images[image_id]),
                "mask_path": os.path.abspath(mask) if mask else "",
                "label": label,
                "group": self.groups.get(image_id, ""),
                "split": self.splits.get(image_id) or self.label_splits.get(image_id, ""),
            }
            # A source column that happens to share a manifest column's name must not overwrite it.
            rows.append(row | {k: v for k, v in self.metadata.get(image_id, {}).items() if k not in row})
        labelled_ids = set(self.labels) | set(self.bad)
        # Readers that find label rows pointing at no file (Derm7pt) have listed them already.
        report.labels_without_images = [*report.labels_without_images, *sorted(labelled_ids - set(self.images))]
        report.masks_without_images = sorted(set(self.masks) - set(self.images))
        report.labelled = sum(1 for r in rows if r["label"])
        if not self.masks:
            report.notes.append("no lesion masks found")
        return ConversionResult(rows=rows, classes=tuple(classes), report=report)


def _require_root(root: Path) -> Path:
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise ConversionError(f"--root {root} {what}: give the folder the dataset was unzipped into")
    return root


def _isic_layout(root: Path) -> tuple[_Layout, list[Path]]:
    """The checked root's files, with every ISIC-named image and mask already collected into a layout."""
    root = _require_root(root)
    files = scan_files(root)
    layout = _Layout(root)
    layout.collect_isic_files(files)
    return layout, files


# ---------------------------------------------------------------------------------------------------------------------
# ISIC challenges


def read_isic2016(root: Path) -> ConversionResult:
    """ISIC 2016 (ISBI): Part 3 ground truth is a header-less ``id,benign|malignant`` CSV (test: ``id,0.0|1.0``)."""
    layout, files = _isic_layout(root)
    values = {"benign": "benign", "malignant": "malignant", "0": "benign", "1": "malignant"}
    values |= {"0.0": "benign", "1.0": "malignant"}
    found = 0
    for table in _tables(files):
        rows = read_table(table)
        if not rows or len(rows[0]) != 2:
            continue
        body = rows if isic_id(rows[0][0]) else rows[1:]  # the published file has no header; tolerate one
        if not body or not isic_id(body[0][0]) or body[0][1].lower() not in values:
            continue
        found += 1
        if body is not rows:
            layout.report.notes.append(f"{table.name}: skipped a header row {rows[0]}")
        for row in body:
            image_id = isic_id(row[0])
            if image_id is None or len(row) < 2:
                layout.report.notes.append(f"{table.name}: unreadable row {row}")
                continue
            label = values.get(row[1].lower())
            layout.add_label(image_id, label, table, f"value {row[1]!r} is not benign/malignant")
    if not found:
        layout.report.notes.append("no Part 3 ground truth found (a header-less CSV of id,benign|malignant)")
    return layout.finish(BINARY_CLASSES, "ISIC_*.jpg")


def read_isic2017(root: Path) -> ConversionResult:
    """ISIC 2017: ``image_id,melanoma,seborrheic_keratosis`` one-hot floats (both 0 = nevus), Part 1 masks."""
    layout, files = _isic_layout(root)
    found = 0
    for table in _tables(files):
        header = _header(table)
        if {"image_id", "melanoma", "seborrheic_keratosis"} <= header:
            found += 1
            for record in read_records(table)[1]:
                image_id = isic_id(record.get("image_id", ""))
                if image_id is None:
                    continue
                hit, ones = _one_hot(record, ("melanoma", "seborrheic_keratosis"), ("melanoma", "seborrheic_keratosis"))
                label = hit if hit else ("nevus" if ones == 0 else None)
                layout.add_label(image_id, label, table, "melanoma and seborrheic_keratosis both 1, or not 0/1")
        elif "image_id" in header and header & {"age_approximate", "sex"}:
            for record in read_records(table)[1]:
                if image_id := isic_id(record.get("image_id", "")):
                    layout.add_metadata(image_id, {"age": record.get("age_approximate"), "sex": record.get("sex")})
    if not found:
        layout.report.notes.append("no Part 3 ground truth found (image_id,melanoma,seborrheic_keratosis)")
    return layout.finish(ISIC2017_CLASSES, "ISIC_*.jpg")


def _add_ham_metadata(layout: _Layout, record: dict[str, str]) -> str | None:
    image_id = isic_id(record.get("image_id") or record.get("image") or "")
    if image_id is None:
        return None
    if lesion := _clean(record.get("lesion_id")):
        layout.groups.setdefault(image_id, lesion)
    layout.add_metadata(
        image_id,
        {
            "age": record.get("age"),
            "sex": record.get("sex"),
            "site": record.get("localization"),
            "dx_type": record.get("dx_type") or record.get("diagnosis_confirm_type"),
            "dataset": record.get("dataset"),
        },
    )
    return image_id


def read_isic2018(root: Path) -> ConversionResult:
    """ISIC 2018: Task 1 masks and/or Task 3 one-hot labels; lesion groups from HAM10000 metadata when present."""
    layout, files = _isic_layout(root)
    columns = tuple(c.lower() for c in ISIC2018_CLASSES)
    found = 0
    for table in _tables(files):
        header = _header(table)
        if "image" in header and set(columns) <= header:
            found += 1
            for record in read_records(table)[1]:
                if image_id := isic_id(record.get("image", "")):
                    label, _ = _one_hot(record, columns, ISIC2018_CLASSES)
                    layout.add_label(image_id, label, table, "not exactly one 1 among MEL..VASC")
        elif "lesion_id" in header and header & {"image", "image_id"}:
            for record in read_records(table)[1]:
                _add_ham_metadata(layout, record)
    if not found:
        layout.report.notes.append(
            "no Task 3 ground truth found (image,MEL,NV,BCC,AKIEC,BKL,DF,VASC): images unlabelled"
        )
    if not layout.groups:
        layout.report.notes.append("no lesion groups (HAM10000_metadata or Task 3 LesionGroupings CSV): one per image")
    result = layout.finish(ISIC2018_CLASSES, "ISIC_*.jpg")
    if found and layout.masks:
        result.report.notes.append("Task 1 (masks) and Task 3 (labels) cover different images in the challenge")
    return result


def read_isic2019(root: Path) -> ConversionResult:
    """ISIC 2019: one-hot ``image,MEL,...,SCC,UNK`` ground truth; lesion_id, age, sex, site from the metadata CSV."""
    layout, files = _isic_layout(root)
    found = 0
    for table in _tables(files):
        header = _header(table)
        if "image" in header and {"mel", "nv", "scc"} <= header:
            found += 1
            classes = [c for c in ISIC2019_CLASSES if c.lower() in header]
            for record in read_records(table)[1]:
                if image_id := isic_id(record.get("image", "")):
                    label, _ = _one_hot(record, [c.lower() for c in classes], classes)
                    layout.add_label(image_id, label, table, f"not exactly one 1 among {','.join(classes)}")
        elif "image" in header and header & {"lesion_id", "age_approx", "anatom_site_general"}:
            for record in read_records(table)[1]:
                if image_id := isic_id(record.get("image", "")):
                    if lesion := _clean(record.get("lesion_id")):
                        layout.groups.setdefault(image_id, lesion)
                    site = record.get("anatom_site_general")
                    layout.add_metadata(
                        image_id, {"age": record.get("age_approx"), "sex": record.get("sex"), "site": site}
                    )
    if not found:
        layout.report.notes.append("no ground truth found (image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK): images unlabelled")
    # UNK is an empty column in the training ground truth; a class nobody carries would only confuse the metrics.
    uses_unk = "UNK" in layout.labels.values()
    classes = ISIC2019_CLASSES if uses_unk else ISIC2019_CLASSES[:-1]
    return layout.finish(classes, "ISIC_*.jpg")


def read_isic2020(root: Path) -> ConversionResult:
    """SIIM-ISIC 2020: ``train.csv`` (``target`` 0/1 = benign/malignant), groups by ``patient_id``."""
    layout, files = _isic_layout(root)
    found = 0
    for table in _tables(files):
        header = _header(table)
        if not header & {"image_name", "image"} or not header & {"patient_id", "patient", "target"}:
            continue
        labelled = bool(header & {"target", "benign_malignant"})
        found += int(labelled)
        for record in read_records(table)[1]:
            image_id = isic_id(record.get("image_name") or record.get("image") or "")
            if image_id is None:
                continue
            if patient := _clean(record.get("patient_id") or record.get("patient")):
                layout.groups.setdefault(image_id, patient)
            layout.add_metadata(
                image_id,
                {
                    "age": record.get("age_approx"),
                    "sex": record.get("sex"),
                    "site": record.get("anatom_site_general_challenge") or record.get("anatom_site_general"),
                    "diagnosis": record.get("diagnosis"),
                    "lesion_id": record.get("lesion_id"),
                },
            )
            if labelled:
                target = record.get("target", "").strip()
                if target:
                    label = {"0": "benign", "1": "malignant", "0.0": "benign", "1.0": "malignant"}.get(target)
                else:
                    word = record.get("benign_malignant", "").strip().lower()
                    label = word if word in BINARY_CLASSES else None
                layout.add_label(image_id, label, table, f"target {target!r} is not 0/1")
            elif split := official_split(table, layout.root, include_name=True):
                layout.label_splits.setdefault(image_id, split)
    if not found:
        layout.report.notes.append("no train.csv with a target column found: images unlabelled")
    return layout.finish(BINARY_CLASSES, "ISIC_*.jpg")


def read_ham10000(root: Path) -> ConversionResult:
    """HAM10000: ``HAM10000_metadata.csv`` (lesion_id, image_id, dx, ...), optional tschandl lesion masks."""
    layout, files = _isic_layout(root)
    found = 0
    for table in _tables(files):
        if not {"image_id", "dx"} <= _header(table):
            continue
        found += 1
        for record in read_records(table)[1]:
            image_id = _add_ham_metadata(layout, record)
            if image_id is None:
                continue
            dx = record.get("dx", "").strip().lower()
            label = dx if dx in HAM10000_CLASSES else None
            layout.add_label(image_id, label, table, f"dx {dx!r} is not one of {','.join(HAM10000_CLASSES)}")
    if not found:
        layout.report.notes.append("no HAM10000_metadata CSV (image_id, dx, lesion_id) found: images unlabelled")
    return layout.finish(HAM10000_CLASSES, "ISIC_*.jpg")


# ---------------------------------------------------------------------------------------------------------------------
# PH2, Derm7pt, class folders


_PH2_IMAGE = re.compile(r"^(IMD\d+)\.(?:bmp|png|jpe?g|tiff?)$", re.IGNORECASE)
_PH2_MASK = re.compile(r"^(IMD\d+)_lesion\.(?:bmp|png|tiff?)$", re.IGNORECASE)
_PH2_CRITERIA = ("asymmetry", "pigment_network", "dots_globules", "streaks", "regression_areas", "blue_whitish_veil")


def read_ph2(root: Path) -> ConversionResult:
    """PH2: ``PH2_dataset.txt``, a '||' table of Name, Histological and Clinical Diagnosis (0/1/2), criteria, colors."""
    root = _require_root(root)
    files = scan_files(root)
    layout = _Layout(root)
    for path in files:
        if mask := _PH2_MASK.match(path.name):
            layout.add_mask(mask.group(1), path)
        elif image := _PH2_IMAGE.match(path.name):
            layout.add_image(image.group(1), path)
    tables = [f for f in files if f.suffix.lower() == ".txt" and "ph2" in f.name.lower()]
    for table in tables:
        for line in table.read_text(encoding="utf-8", errors="replace").splitlines():
            cells = [c.strip() for c in line.split("||")]
            if len(cells) < 4 or not re.fullmatch(r"IMD\d+", cells[1]):
                continue  # header, legend and blank lines
            image_id, histology, clinical = cells[1], cells[2], cells[3]
            label = dict(enumerate(PH2_CLASSES)).get(int(clinical)) if clinical.isdigit() else None
            layout.add_label(image_id, label, table, f"clinical diagnosis {clinical!r} is not 0, 1 or 2")
            values: dict[str, str | None] = {"histology": histology}
            criteria = [c.strip() for c in cells[4].split("|")] if len(cells) > 4 else []
            if len(criteria) == len(_PH2_CRITERIA):
                values |= dict(zip(_PH2_CRITERIA, criteria))
            if len(cells) > 5:
                values["colors"] = " ".join(cells[5].split())
            layout.add_metadata(image_id, values)
    if not tables:
        layout.report.notes.append("no PH2_dataset.txt found: images unlabelled")
    return layout.finish(PH2_CLASSES, "PH2 IMDxxx.bmp")


def _unique_ids(paths: dict[str, Path], base: Path, report: ConversionReport) -> dict[str, Path]:
    """Key images by file stem, or by their path under ``base`` when two files share a stem."""
    stems = Counter(p.stem for p in paths.values())
    if all(n == 1 for n in stems.values()):
        return {p.stem: p for p in paths.values()}
    report.notes.append("file names repeat across folders: image ids are paths under --root without the extension")
    return {p.relative_to(base).with_suffix("").as_posix(): p for p in paths.values()}


def read_derm7pt(root: Path) -> ConversionResult:
    """Derm7pt: ``meta/meta.csv`` (dermoscopic image in ``derm``, ``diagnosis``, ``case_num``), official index split."""
    root = _require_root(root)
    files = scan_files(root)
    metas = [t for t in _tables(files) if {"case_num", "diagnosis", "derm"} <= _header(t)]
    if not metas:
        raise ConversionError(f"no Derm7pt meta/meta.csv (case_num, diagnosis, derm columns) under {root}")
    meta = metas[0]
    _, records = read_records(meta)
    # meta.csv names images relative to images/; match on the trailing path parts so any unzip depth works.
    by_tail: dict[str, Path] = {}
    for path in files:
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            parts = path.relative_to(root).parts
            for k in range(1, len(parts) + 1):
                by_tail.setdefault("/".join(parts[-k:]).lower(), path)
    split_of_row: dict[int, str] = {}
    for name, split in (("train", "train"), ("valid", "val"), ("test", "test")):
        index_file = meta.parent / f"{name}_indexes.csv"
        if not index_file.is_file():
            continue
        for row in read_table(index_file)[1:]:
            if not row or not row[0].strip().lstrip("-").isdigit():
                continue
            index = int(row[0])
            if not 0 <= index < len(records):
                raise ConversionError(f"{index_file} names row {index}, but {meta} has {len(records)} rows")
            split_of_row[index] = split
    layout = _Layout(root)
    found: dict[str, Path] = {}
    row_of: dict[str, int] = {}
    for index, record in enumerate(records):
        derm = record.get("derm", "").strip().replace("\\", "/")
        path = by_tail.get(derm.lower())
        if path is None:
            layout.report.labels_without_images.append(f"row {index} ({derm or 'no derm image'})")
            continue
        found[str(index)] = path
        row_of[str(index)] = index
    ids = _unique_ids(found, root, layout.report)
    index_of = {path: row_of[key] for key, path in found.items()}
    skip = {"case_num", "diagnosis", "clinic", "derm", "case_id", "notes"}
    for image_id, path in ids.items():
        index = index_of[path]
        record = records[index]
        layout.add_image(image_id, path, split_of_row.get(index, ""))
        layout.add_label(image_id, _clean(record.get("diagnosis")) or None, meta, "empty diagnosis")
        layout.groups[image_id] = f"case_{record.get('case_num', '').strip()}"
        values = {("site" if k == "location" else k): v for k, v in record.items() if k not in skip}
        clinic = by_tail.get(record.get("clinic", "").strip().replace("\\", "/").lower())
        values["clinic_path"] = os.path.abspath(clinic) if clinic else ""
        layout.add_metadata(image_id, values)
    classes = sorted({_clean(r.get("diagnosis")) for r in records} - {""})
    result = layout.finish(classes, "Derm7pt dermoscopic")
    if not split_of_row:
        result.report.notes.append("no meta/{train,valid,test}_indexes.csv found: no official split")
    return result


_FOLDER_SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_MASK_SUFFIXES = ("_segmentation", "_mask")


def _mask_stem(path: Path) -> str:
    stem = path.stem
    for suffix in _MASK_SUFFIXES:
        if stem.lower().endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def read_folder(root: Path) -> ConversionResult:
    """One sub-folder per class (sorted), optionally inside train/val/test folders, or a flat unlabelled folder.

    Masks sit in a ``masks/`` folder beside the images, named like the image (optionally ``_segmentation``).
    """
    root = _require_root(root)
    layout = _Layout(root)

    def subfolders(folder: Path) -> list[Path]:
        return sorted(d for d in folder.iterdir() if d.is_dir() and not _skipped(d.name) and d.name != "masks")

    top = subfolders(root)
    split_layout = bool(top) and all(d.name.lower() in _FOLDER_SPLITS for d in top)
    bases = [(d, _FOLDER_SPLITS[d.name.lower()]) for d in top] if split_layout else [(root, "")]
    images: dict[str, Path] = {}
    labels: dict[Path, str] = {}
    splits: dict[Path, str] = {}
    classes: set[str] = set()
    loose = 0
    for base, split in bases:
        for path in scan_files(base):
            rel = path.relative_to(base)
            if path.suffix.lower() not in IMAGE_EXTENSIONS or "masks" in rel.parts[:-1]:
                continue
            images[str(path)] = path
            splits[path] = split
            if len(rel.parts) > 1:
                labels[path] = rel.parts[0]
                classes.add(rel.parts[0])
            else:
                loose += 1
    if classes and loose:
        layout.report.notes.append(f"{loose} image(s) beside the class folders: kept unlabelled")
    if not classes:
        layout.report.notes.append("no class sub-folders: a flat folder of unlabelled images")
    for image_id, path in _unique_ids(images, root, layout.report).items():
        layout.add_image(image_id, path, splits[path])
        if path in labels:
            layout.labels[image_id] = labels[path]
    id_of_stem = {path.stem: image_id for image_id, path in layout.images.items()}
    for path in scan_files(root):
        rel = path.relative_to(root)
        if "masks" in rel.parts[:-1] and path.suffix.lower() in IMAGE_EXTENSIONS:
            stem = _mask_stem(path)
            layout.add_mask(id_of_stem.get(stem, stem), path)
    return layout.finish(sorted(classes), "image")


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


def _did_you_mean(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name.lower(), list(choices), n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}? " if close else ""


def get_reader(name: str) -> ReaderFn:
    """The reader registered under ``name``; an unknown name lists the valid ones."""
    if name.lower() in FORMATS:
        return FORMATS[name.lower()]
    raise ConversionError(f"unknown format {name!r}: {_did_you_mean(name, FORMATS)}valid formats: {', '.join(FORMATS)}")


# ---------------------------------------------------------------------------------------------------------------------
# Class maps


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
        raise ConversionError(f"cannot read class map {path}: {error}") from error
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
                    f"unknown class map {piece!r}: {_did_you_mean(piece, BUILTIN_MAPS)}built-in maps: "
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


# ---------------------------------------------------------------------------------------------------------------------
# Splits and the whole conversion


def resolve_splits(
    manifest: Manifest,
    fractions: Sequence[float],
    seed: int,
    keep_official: bool,
    report: ConversionReport,
) -> Manifest:
    """Keep an official split and carve the sides it lacks out of its training rows; else split afresh.

    Fresh splits are stratified by class and grouped by lesion/patient (data.splits). ISIC 2016 publishes only
    train and test, so its val side is carved from the official train rows with the same grouping.
    """
    official = {r.get("split", "") for r in manifest.rows} - {""}
    if not official or not keep_official:
        if official:
            report.notes.append(f"official split ({', '.join(sorted(official))}) ignored: --resplit")
        cleared = manifest.with_column("split", [""] * len(manifest))
        return assign_splits(cleared, fractions, seed, keep_existing=False)
    kept = Counter(r.get("split", "") for r in manifest.rows)
    report.notes.append("official split kept: " + ", ".join(f"{s} {kept[s]}" for s in SPLITS if kept[s]))
    missing = [s for s in ("val", "test") if s not in official]
    if not missing:
        out = assign_splits(manifest, fractions, seed, keep_existing=True)
    else:
        share = dict(zip(SPLITS, fractions))
        pool_fractions = [share["train"]] + [share[s] if s in missing else 0.0 for s in ("val", "test")]
        total = sum(pool_fractions)
        pool = [i for i, r in enumerate(manifest.rows) if r.get("split", "") in ("", "train")]
        splits = [r.get("split", "") for r in manifest.rows]
        if pool and total > 0:
            sub = Manifest(rows=tuple({**manifest.rows[i], "split": ""} for i in pool), classes=manifest.classes)
            sub = assign_splits(sub, [f / total for f in pool_fractions], seed, keep_existing=False)
            for i, row in zip(pool, sub.rows):
                splits[i] = row["split"]
            report.notes.append(f"official split has no {' or '.join(missing)}: carved from its train rows")
        out = manifest.with_column("split", splits)
    sides: dict[str, set[str]] = {}
    for row in out.rows:
        if row.get("group"):
            sides.setdefault(row["group"], set()).add(row["split"])
    straddling = sorted(g for g, s in sides.items() if len(s) > 1)
    if straddling:
        report.notes.append(
            f"{len(straddling)} lesion groups lie on two sides of the official split (kept as published), "
            f"e.g. {', '.join(straddling[:3])}"
        )
    return out


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
    root = _require_root(Path(root))
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
