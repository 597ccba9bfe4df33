"""The ``folder`` format: one sub-folder per class (optionally under train/val/test), or a flat unlabelled folder."""

from __future__ import annotations

from pathlib import Path

from dermpipe.data.formats.layout import ConversionResult, Layout, is_skipped, require_root, scan_files, unique_ids
from dermpipe.data.listing import format_problem
from dermpipe.data.reading import IMAGE_EXTENSIONS

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
    root = require_root(root)
    layout = Layout(root)

    def subfolders(folder: Path) -> list[Path]:
        return sorted(d for d in folder.iterdir() if d.is_dir() and not is_skipped(d.name) and d.name != "masks")

    top = subfolders(root)
    split_layout = bool(top) and all(d.name.lower() in _FOLDER_SPLITS for d in top)
    bases = [(d, _FOLDER_SPLITS[d.name.lower()]) for d in top] if split_layout else [(root, "")]
    images: dict[str, Path] = {}
    labels: dict[Path, str] = {}
    splits: dict[Path, str] = {}
    classes: set[str] = set()
    loose = 0
    not_taken: list[str] = []
    outside: list[str] = []
    for base, split in bases:
        links: list[tuple[Path, str]] = []
        files = scan_files(base, links)
        outside += [f"{str(path.relative_to(base))[:80]!r}: {reason}" for path, reason in links]
        for path in files:
            rel = path.relative_to(base)
            if "masks" in rel.parts[:-1]:
                continue
            if problem := format_problem(path):  # named in the report, never dropped silently
                not_taken.append(f"{str(rel)[:80]!r}: {problem}")
                continue
            images[str(path)] = path
            splits[path] = split
            if len(rel.parts) > 1:
                labels[path] = rel.parts[0]
                classes.add(rel.parts[0])
            else:
                loose += 1
    for items, what in ((not_taken, "file(s) not taken"), (outside, "link(s) out of the folder not followed")):
        if items:
            shown = "; ".join(items[:5]) + (f"; and {len(items) - 5} more" if len(items) > 5 else "")
            layout.report.notes.append(f"{len(items)} {what}: {shown}")
    if classes and loose:
        layout.report.notes.append(f"{loose} image(s) beside the class folders: kept unlabelled")
    if not classes:
        layout.report.notes.append("no class sub-folders: a flat folder of unlabelled images")
    for image_id, path in unique_ids(images, root, layout.report).items():
        layout.add_image(image_id, path, splits[path])
        if path in labels and layout.images.get(image_id) == path:  # a refused image brings no label
            layout.labels[image_id] = labels[path]
    id_of_stem = {path.stem: image_id for image_id, path in layout.images.items()}
    for path in scan_files(root):
        rel = path.relative_to(root)
        if "masks" in rel.parts[:-1] and path.suffix.lower() in IMAGE_EXTENSIONS:
            stem = _mask_stem(path)
            layout.add_mask(id_of_stem.get(stem, stem), path)
    return layout.finish(sorted(classes), "image")
