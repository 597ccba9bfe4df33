"""Shared reader machinery: the report, file scanning, ISIC file names, tables, the row accumulator, splits."""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dermpipe.data.formats.tables import ConversionError, first_line, table_files
from dermpipe.data.listing import walk_files
from dermpipe.data.manifest import SPLITS, Manifest, id_problem
from dermpipe.data.splits import assign_splits

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


def is_skipped(name: str) -> bool:
    """Whether a file or folder name is hidden or macOS archive debris, never part of a dataset."""
    # Zip archives made on macOS carry __MACOSX/ and ._name resource forks that look like images by name.
    return name.startswith(".") or name == "__MACOSX"


def scan_files(root: Path, excluded: list[tuple[Path, str]] | None = None) -> list[Path]:
    """Every file under ``root`` in a fixed order, following folder links once, without hidden entries; links that
    resolve outside ``root`` are not followed nor listed (``excluded`` collects them with their reason)."""
    return walk_files(root, is_skipped, excluded=excluded)


def official_split(path: Path, root: Path, include_name: bool = False) -> str:
    """train/val/test when a folder (or the file name) under ``root`` says so, e.g. ``ISIC-2017_Validation_Data``."""
    rel = path.relative_to(root)
    parts = list(rel.parts[:-1]) + ([rel.stem] if include_name else [])
    for part in reversed(parts):  # the deepest folder that names a split wins
        for word in re.split(r"[^a-z0-9]+", part.lower()):
            if word in _SPLIT_WORDS:
                return _SPLIT_WORDS[word]
    return ""


def clean_value(value: str | None) -> str:
    """A stripped cell, or an empty string for the spellings of a missing value (``unknown``, ``nan``, ...)."""
    value = (value or "").strip()
    return "" if value.lower() in _MISSING_VALUES else value


def refuse_unread_label_tables(files: Iterable[Path], name_pattern: str, expected: str) -> None:
    """Called when a reader recognised no label table: a table named like one (``name_pattern``, a regex on the file
    name) is a table it cannot parse, and converting every image unlabelled would hide that. One error names it."""
    named = [t for t in table_files(files) if re.search(name_pattern, t.name, re.IGNORECASE)]
    if named:
        more = f"; {len(named) - 1} more such file(s)" if len(named) > 1 else ""
        raise ConversionError(
            f"{named[0]} is named like the label table but cannot be read as one: expected {expected}, its first "
            f"line reads {first_line(named[0])[:120]!r} (save it as a comma-separated UTF-8 CSV with the published "
            f"header{more})"
        )


def isic_id(name: str) -> str | None:
    """``ISIC_0000000`` from ``ISIC_0000000``, ``ISIC_0000000_downsampled`` or an image file name; else None."""
    match = ISIC_ID.match(name.strip()) or ISIC_IMAGE.match(name.strip())
    return match.group(1) if match else None


# ---------------------------------------------------------------------------------------------------------------------
# Assembling rows


@dataclass
class Layout:
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
    # per label table: [rows with a class, rows without one, the first problem]
    label_sources: dict[Path, list] = field(default_factory=dict)

    def add_image(self, image_id: str, path: Path, split: str = "") -> None:
        if problem := id_problem(image_id):
            self.report.notes.append(f"{str(path.relative_to(self.root))[:80]!r} skipped: its image id {problem}")
            return
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
        counts = self.label_sources.setdefault(source, [0, 0, ""])
        counts[label is None] += 1
        counts[2] = counts[2] or ("" if label is not None else problem)
        if label is None:
            self.bad.setdefault(image_id, problem or f"unusable label row in {source.name}")
            return
        previous = self.labels.setdefault(image_id, label)
        if previous != label:
            self.bad[image_id] = f"labels {previous!r} and {label!r} disagree"

    def add_metadata(self, image_id: str, values: dict[str, str | None]) -> None:
        entry = self.metadata.setdefault(image_id, {})
        for key, value in values.items():
            value = clean_value(value)
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
        for source, (good, bad, problem) in self.label_sources.items():
            if bad and not good:  # a table read as labels of which no row names a class: not the table it seems
                raise ConversionError(
                    f"{source}: none of its {bad} label rows names a class (first: {problem or 'no label'}): is it "
                    "the label table as published, unedited?"
                )
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


def require_root(root: Path) -> Path:
    """The absolute ``--root`` folder; a missing folder or a file is a ConversionError."""
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise ConversionError(f"--root {root} {what}: give the folder the dataset was unzipped into")
    return root


def isic_layout(root: Path) -> tuple[Layout, list[Path]]:
    """The checked root's files, with every ISIC-named image and mask already collected into a layout."""
    root = require_root(root)
    files = scan_files(root)
    layout = Layout(root)
    layout.collect_isic_files(files)
    return layout, files


def unique_ids(paths: dict[str, Path], base: Path, report: ConversionReport) -> dict[str, Path]:
    """Key images by file stem, or by their path under ``base`` when two files share a stem."""
    stems = Counter(p.stem for p in paths.values())
    if all(n == 1 for n in stems.values()):
        return {p.stem: p for p in paths.values()}
    report.notes.append("file names repeat: image ids are paths under --root without the extension (with it where two "
                        "files differ only by their extension, e.g. dup.jpg and dup.png)")  # fmt: skip
    stem_ids = {p: p.relative_to(base).with_suffix("").as_posix() for p in paths.values()}
    counts = Counter(stem_ids.values())
    return {(i if counts[i] == 1 else p.relative_to(base).as_posix()): p for p, i in stem_ids.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Official splits


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
