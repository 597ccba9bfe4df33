"""The manifest: one CSV row per image (id, paths, label, group, split, metadata), class names in a JSON sidecar."""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from dermpipe.engine.files import atomic_path, write_text_atomic
from dermpipe.errors import DermpipeError

MANIFEST_COLUMNS: tuple[str, ...] = ("image_id", "image_path", "mask_path", "label", "group", "split")
SPLITS: tuple[str, ...] = ("train", "val", "test")


class ManifestError(DermpipeError):
    """A manifest that cannot be read or does not fit what a stage needs."""


def write_table(path: str | os.PathLike, columns: Sequence[str], rows: Iterable[Mapping[str, object]]) -> Path:
    """Write a CSV table atomically (temporary name, then rename), so a reader never sees half of it."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON file beside a manifest that stores its class names in order (``runs/ham.csv`` -> ``runs/ham.json``)."""
    return Path(path).with_suffix(".json")


@dataclass(frozen=True)
class Manifest:
    """Rows of string fields keyed by column name, plus the class vocabulary in its fixed order.

    Paths are stored absolute, or relative to the manifest file's folder (resolved on reading). ``label`` is a class
    name or empty (unlabelled); ``split`` is train/val/test or empty; ``group`` is the lesion or patient id that must
    stay on one side of every split. Any other column (age, sex, site, fold, ...) is metadata and kept as is.
    """

    rows: tuple[dict[str, str], ...]
    classes: tuple[str, ...]
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for row in self.rows:
            missing = [c for c in ("image_id", "image_path") if not row.get(c)]
            if missing:
                raise ManifestError(f"manifest row {row!r} lacks {', '.join(missing)}")
            label = row.get("label", "")
            if label and label not in self.classes:
                raise ManifestError(
                    f"label {label!r} of image {row['image_id']} is not one of the classes {list(self.classes)}"
                )

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def columns(self) -> list[str]:
        extra: list[str] = []
        for row in self.rows:
            extra.extend(k for k in row if k not in MANIFEST_COLUMNS and k not in extra)
        return [*MANIFEST_COLUMNS, *extra]

    def select(self, split: str | None = None, labelled: bool = False) -> Manifest:
        """The rows of one split (``None`` keeps all), optionally only those with a label."""
        rows = tuple(
            r for r in self.rows if (split is None or r.get("split", "") == split) and (not labelled or r.get("label"))
        )
        return replace(self, rows=rows)

    def with_column(self, name: str, values: Sequence[str]) -> Manifest:
        if len(values) != len(self.rows):
            raise ManifestError(f"column {name!r} has {len(values)} values for {len(self.rows)} rows")
        rows = tuple({**r, name: str(v)} for r, v in zip(self.rows, values))
        return replace(self, rows=rows)

    def label_indices(self) -> list[int]:
        """Class index per row; -1 where the row has no label."""
        index = {c: i for i, c in enumerate(self.classes)}
        return [index.get(r.get("label", ""), -1) for r in self.rows]

    def class_counts(self) -> dict[str, int]:
        counts = Counter(r.get("label", "") for r in self.rows)
        return {c: counts.get(c, 0) for c in self.classes}

    def write(self, path: str | os.PathLike) -> Path:
        """Write the CSV and its class sidecar atomically (temporary name, then rename)."""
        path = Path(path)
        columns = self.columns  # a property that walks every row: compute once, not once per row
        with atomic_path(path) as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
                writer.writeheader()
                for row in self.rows:
                    writer.writerow({c: row.get(c, "") for c in columns})
            # the class sidecar lands first, the CSV last: a manifest that exists has its classes beside it
            write_text_atomic(
                sidecar_path(path), json.dumps({"classes": list(self.classes), **self.info}, indent=2) + "\n"
            )
        return path

    @classmethod
    def read(cls, path: str | os.PathLike, classes: Iterable[str] | None = None) -> Manifest:
        """Read a manifest CSV; class names come from ``classes``, else the JSON sidecar, else sorted labels."""
        path = Path(path)
        if not path.is_file():
            raise ManifestError(f"manifest {path} not found: make one with `python data/convert.py` first")
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in ("image_id", "image_path") if c not in header]
            if missing:
                raise ManifestError(f"manifest {path} has no column {', '.join(missing)}: is it a manifest?")
            rows = [{k: (v or "") for k, v in r.items() if k is not None} for r in reader]
        base = path.parent
        for r in rows:
            for col in ("image_path", "mask_path"):
                p = r.get(col, "")
                if p and not os.path.isabs(p):
                    r[col] = str((base / p).resolve())
        info: dict = {}
        side = sidecar_path(path)
        if classes is None and side.is_file():
            info = json.loads(side.read_text())
            classes = info.pop("classes", None)
        if classes is None:
            classes = sorted({r.get("label", "") for r in rows} - {""})
        return cls(rows=tuple(rows), classes=tuple(classes), info=info)


def manifest_from_folder(folder: str | os.PathLike) -> Manifest:
    """An unlabelled manifest of every image under ``folder`` (recursive); ids are paths relative to it."""
    from dermpipe.data.reading import ImageReadError, list_images  # reading sits beside, not below, manifests

    root = Path(folder)
    if not root.is_dir():
        raise ImageReadError(f"{root}: not a folder of images (check --input)")
    rows = []
    for path in list_images(root):
        rel = path.relative_to(root).with_suffix("")
        rows.append({"image_id": rel.as_posix(), "image_path": str(path.resolve())})
    return Manifest(rows=tuple(rows), classes=())
