"""The manifest: one CSV row per image (id, paths, label, group, split, metadata), class names in a JSON sidecar.

``list_folder`` makes one from a folder of photos and gives every other entry of the folder a reason.
"""

from __future__ import annotations

import csv
import json
import os
import re
import stat
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from dermpipe.engine import csvsafe
from dermpipe.engine.files import atomic_path, write_text_atomic
from dermpipe.errors import DermpipeError

MANIFEST_COLUMNS: tuple[str, ...] = ("image_id", "image_path", "mask_path", "label", "group", "split")
SPLITS: tuple[str, ...] = ("train", "val", "test")
_ID_FIX = "ids are relative names like 'ISIC_0000000' or 'clinic/photo'"
_SHOWN = 5  # how many offending ids or labels an error names


class ManifestError(DermpipeError):
    """A manifest that cannot be read or does not fit what a stage needs."""


def write_table(path: str | os.PathLike, columns: Sequence[str], rows: Iterable[Mapping[str, object]]) -> Path:
    """Write a UTF-8 CSV table atomically (temporary name, then rename), so a reader never sees half of it; text
    cells a spreadsheet would run as a formula are escaped (``csvsafe``)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csvsafe.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON file beside a manifest that stores its class names in order (``runs/ham.csv`` -> ``runs/ham.json``)."""
    return Path(path).with_suffix(".json")


def id_problem(image_id: str) -> str:
    """What makes ``image_id`` unusable as an image id (it names output files), or ``""``: empty, a control
    character (newline, NUL, ...), an absolute path or a ``..`` path part."""
    if not image_id:
        return "is empty"
    control = next((c for c in image_id if unicodedata.category(c) == "Cc"), None)
    if control is not None:
        return f"contains the control character U+{ord(control):04X}"
    if image_id.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", image_id):
        return "is an absolute path"
    if ".." in re.split(r"[/\\]", image_id):
        return "has a '..' path part"
    return ""


def _examples(items: Mapping[str, list[int]], what: str) -> str:
    shown = "; ".join(
        f"{key!r} ({len(lines)} {what}, lines {', '.join(map(str, lines[:3]))}{', ...' if len(lines) > 3 else ''})"
        for key, lines in list(items.items())[:_SHOWN]
    )
    return shown + (f"; and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


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
        """Write the UTF-8 CSV and its class sidecar atomically (temporary name, then rename)."""
        path = Path(path)
        columns = self.columns  # a property that walks every row: compute once, not once per row
        with atomic_path(path) as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                writer = csvsafe.DictWriter(f, fieldnames=columns, extrasaction="ignore")
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
        """Read a manifest CSV; class names come from ``classes``, else the JSON sidecar, else sorted labels.

        Every problem is one ManifestError line naming the file (and the row's line where there is one): not a
        UTF-8 CSV, a missing column, an empty, absolute, ``..`` or control-character id, repeated ids, labels that
        are not among the classes, an unreadable sidecar.
        """
        path = Path(path)
        rows, lines = _read_rows(path)
        info: dict = {}
        side = sidecar_path(path)
        source = "the classes given"
        if classes is None and side.is_file():
            info = _read_sidecar(side)
            classes = info.pop("classes", None)
            source = f"its sidecar {side}"
        if classes is None:
            classes, source = sorted({r.get("label", "") for r in rows} - {""}), "its labels"
        classes = tuple(classes)
        known = set(classes)
        unknown: dict[str, list[int]] = {}
        for row, line in zip(rows, lines):
            if row.get("label", "") and row["label"] not in known:
                unknown.setdefault(row["label"], []).append(line)
        if unknown:
            raise ManifestError(
                f"manifest {path}: labels not among the classes {list(classes)} of {source}: "
                f"{_examples(unknown, 'rows')} (fix the labels, or the class list in {side})"
            )
        base = path.parent
        for r in rows:
            for col in ("image_path", "mask_path"):
                p = r.get(col, "")
                if p and not os.path.isabs(p):
                    r[col] = str((base / p).resolve())
        return cls(rows=tuple(rows), classes=classes, info=info)


def _read_rows(path: Path) -> tuple[list[dict[str, str]], list[int]]:
    """The rows of a manifest CSV and the line each ends on, with the ids and paths checked."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        raise ManifestError(f"manifest {path} not found: make one with `python data/convert.py` first") from None
    if stat.S_ISDIR(mode):
        raise ManifestError(f"manifest {path} is a folder: pass the manifest CSV file (e.g. runs/ham.csv)")
    if not stat.S_ISREG(mode):
        raise ManifestError(f"manifest {path} is not a regular file (a pipe or device?): pass the manifest CSV file")
    rows: list[dict[str, str]] = []
    lines: list[int] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csvsafe.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in ("image_id", "image_path") if c not in header]
            if not header:
                raise ManifestError(
                    f"manifest {path} is empty: no header line (make one with `python data/convert.py`)"
                )
            if missing:
                shown = ", ".join(repr(h[:40]) for h in header[:8]) + (", ..." if len(header) > 8 else "")
                raise ManifestError(
                    f"manifest {path} has no column {', '.join(missing)}: is it a manifest? (its columns: {shown})"
                )
            for r in reader:
                rows.append({k: (v or "") for k, v in r.items() if k is not None})
                lines.append(reader.line_num)
    except UnicodeDecodeError as error:
        byte = error.object[error.start : error.start + 1].hex()
        raise ManifestError(
            f"manifest {path} is not UTF-8 text (it holds the byte 0x{byte}): save it as a UTF-8 CSV"
        ) from None
    except csv.Error as error:
        raise ManifestError(f"manifest {path} is not a readable CSV: {error}") from None
    seen: dict[str, list[int]] = {}
    for row, line in zip(rows, lines):
        for col in ("image_id", "image_path"):
            if not row.get(col):
                raise ManifestError(f"manifest {path} line {line}: empty {col} (every row needs an image_id and path)")
        if problem := id_problem(row["image_id"]):
            raise ManifestError(f"manifest {path} line {line}: image id {row['image_id']!r} {problem} ({_ID_FIX})")
        for col in ("image_path", "mask_path"):
            if "\x00" in row.get(col, ""):
                raise ManifestError(f"manifest {path} line {line}: {col} contains a NUL character (fix the path)")
        seen.setdefault(row["image_id"], []).append(line)
    repeated = {image_id: at for image_id, at in seen.items() if len(at) > 1}
    if repeated:
        raise ManifestError(
            f"manifest {path}: {len(repeated)} image ids repeat: {_examples(repeated, 'rows')} (every row needs its "
            "own image_id: remove the repeated rows or give them distinct ids)"
        )
    return rows, lines


def _read_sidecar(side: Path) -> dict:
    try:
        info = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ManifestError(
            f"class sidecar {side} is not readable JSON: {error} (fix it or rewrite the manifest)"
        ) from None
    classes = info.get("classes") if isinstance(info, dict) else None
    if not isinstance(info, dict) or not (
        classes is None or (isinstance(classes, list) and all(isinstance(c, str) and c for c in classes))
    ):
        raise ManifestError(f"class sidecar {side} must be a JSON object whose 'classes' is a list of class names")
    twice = sorted(c for c, n in Counter(classes or []).items() if n > 1)
    if twice:
        raise ManifestError(f"class sidecar {side} lists the classes {twice} twice: each class once, in order")
    return info


# ---------------------------------------------------------------------------------------------------------------------
# A folder of photos
