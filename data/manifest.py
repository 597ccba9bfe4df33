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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

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


@dataclass(frozen=True)
class FolderListing:
    """Every entry under a folder, once: a manifest row per image the reader takes, or an ``excluded`` row.

    ``excluded`` rows have ``image_id`` (the path relative to the folder, suffix kept: no manifest id), ``path``
    (absolute, the link itself for a link) and ``reason`` (what is wrong and how to include it).
    """

    manifest: Manifest
    excluded: tuple[dict[str, str], ...]


def _printable(text: str) -> str:
    """A name safe to print and write as UTF-8: undecodable bytes and control characters as escapes."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if unicodedata.category(c) != "Cc" else repr(c)[1:-1] for c in text)


def _name_problem(rel: str) -> str:
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8 (rename it to include it)"
    if any(unicodedata.category(c) == "Cc" for c in rel):
        return "its name holds a control character such as a newline (rename it to include it)"
    return ""


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links
    except OSError:  # a link loop: classified as a file, whose stat says so
        return False


def _walk(root: Path, follow_links: bool = False, outputs: Sequence[str] = ()) -> Iterator[tuple[Path, str]]:
    """(path, reason) for every entry under ``root``: reason ``""`` for a non-folder entry to classify, else why the
    entry (a hidden file or folder, an unreadable folder, a link to a folder listed already, to one of the command's
    ``outputs`` (resolved folders), or to one outside ``root`` unless ``follow_links``) is not listed further.

    Real folders come first; folder links are followed afterwards, once per real folder, so a link loop or a second
    link to a folder never lists a file twice or walks forever, and a file keeps its path outside any link.
    """
    from dermpipe.data.listing import outside_reason, within  # reading sits beside, not below, manifests

    root_real = os.path.realpath(root)
    visited = {root_real}
    pending: list[Path] = [root]
    links: list[Path] = []
    while pending or links:
        if not pending:
            link = links.pop(0)
            real = os.path.realpath(link)
            if any(within(link, out) for out in outputs):
                yield link, f"link to this command's output folder ({real}): not searched (its files are outputs)"
            elif not follow_links and not within(link, root_real):
                yield link, outside_reason(link, folder=True)
            elif real in visited:
                yield link, f"link to a folder listed already ({real}): not listed twice (its files are listed once)"
            else:
                visited.add(real)
                pending.append(link)
            continue
        folder = pending.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as error:
            yield folder, f"folder cannot be read: {error.strerror or error} (check its permissions)"
            continue
        for entry in entries:
            path = Path(folder, entry.name)
            hidden = entry.name.startswith(".")
            if _is_folder(entry):
                if hidden or entry.name == "__MACOSX":
                    what = "macOS archive metadata folder" if not hidden else "hidden folder (its name starts with '.')"
                    yield path, f"{what}: not searched (rename it without the leading dot to include its files)"
                elif entry.is_symlink():
                    links.append(path)
                else:
                    visited.add(os.path.realpath(path))
                    pending.append(path)
            elif hidden:
                yield path, "hidden file (its name starts with '.'): not read (rename it without the dot to include it)"
            else:
                yield path, ""


def _unique_ids(rels: Sequence[str]) -> list[str]:
    """Each file's relative path without its suffix; the whole relative path, suffix kept, for those that would
    share an id (``dup.jpg`` and ``dup.png``), repeated until no two share one (relative paths are unique)."""
    ids = [PurePosixPath(rel).with_suffix("").as_posix() for rel in rels]
    while True:
        counts = Counter(ids)
        clashing = [k for k, image_id in enumerate(ids) if counts[image_id] > 1 and image_id != rels[k]]
        if not clashing:
            return ids
        for k in clashing:
            ids[k] = rels[k]


def list_folder(
    folder: str | os.PathLike,
    mask_names: bool = True,
    follow_links: bool = False,
    outputs: Sequence[str | os.PathLike] = (),
) -> FolderListing:
    """Every entry under ``folder`` (recursive), each either a manifest row or an excluded row with its reason.

    A row per image the reader takes (``image_id``: the path relative to ``folder`` without its suffix, the suffix
    kept where two files would share an id; ``image_path``: absolute). Excluded, never opened: hidden entries,
    formats the reader does not take, names that end like masks (``MASK_SUFFIXES``; ``mask_names=False`` keeps
    them), FIFOs, devices, sockets and links to them, broken links and link loops, empty or too large files,
    unreadable folders, names that are not UTF-8 or hold control characters, and (unless ``follow_links``) links to
    folders or files outside ``folder``: a link to ``/`` is never searched. Nothing in the command's ``outputs``
    folders (links resolved) is ever listed as an input. Both are sorted by path.
    """
    from dermpipe.data.listing import outside_reason, skip_reason, within
    from dermpipe.data.reading import ImageReadError

    root = Path(folder)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "no such folder"
        raise ImageReadError(f"{root}: {what} (give the folder that holds the images; check --input)")
    taken: list[tuple[str, Path]] = []
    excluded: list[dict[str, str]] = []
    root_real = os.path.realpath(root)
    # an output folder that holds the input folder itself (``--output predictions.csv`` run beside ``photos/``) says
    # nothing about which inputs are outputs: only outputs inside the listing, or reached through its links, count
    outputs_real = tuple(real for real in map(os.path.realpath, outputs) if not within(root_real, real))
    for path, reason in _walk(root, follow_links, outputs_real):
        rel = path.relative_to(root).as_posix()
        reason = reason or _name_problem(rel) or skip_reason(path, mask_names)
        if not reason and any(within(path, out) for out in outputs_real):
            reason = f"link into this command's output folder ({os.path.realpath(path)}): not read (it is an output)"
        elif not reason and not follow_links and not within(path, root_real):
            reason = outside_reason(path)
        if reason:
            excluded.append({"image_id": _printable(rel), "path": _printable(os.path.abspath(path)), "reason": reason})
        else:
            taken.append((rel, path))
    taken.sort(key=lambda item: PurePosixPath(item[0]).parts)
    excluded.sort(key=lambda row: Path(row["path"]).parts)
    ids = _unique_ids([rel for rel, _ in taken])
    rows = tuple({"image_id": i, "image_path": str(path.resolve())} for i, (_, path) in zip(ids, taken))
    return FolderListing(Manifest(rows=rows, classes=()), tuple(excluded))


def manifest_from_folder(folder: str | os.PathLike, follow_links: bool = False) -> Manifest:
    """An unlabelled manifest of every image under ``folder`` (recursive): ``list_folder(folder).manifest``."""
    return list_folder(folder, follow_links=follow_links).manifest


def read_inputs(
    manifest: str | os.PathLike | None,
    folder: str | os.PathLike | None,
    follow_links: bool = False,
    outputs: Sequence[str | os.PathLike] = (),
) -> FolderListing:
    """What a prediction command was given: a manifest (nothing excluded), or a folder listed by ``list_folder``
    (``follow_links``: links out of the folder are read too; nothing under ``outputs`` ever is)."""
    if manifest:
        return FolderListing(Manifest.read(manifest), ())
    return list_folder(folder, follow_links=follow_links, outputs=outputs)  # type: ignore[arg-type]


class NothingReadableError(ManifestError):
    """A folder or manifest of which not one image could be read: one line saying how many entries were skipped
    and where their reasons are (prediction and cropping end with it, status 2)."""

    def __init__(self, source: str | os.PathLike, skipped: int, out: str | os.PathLike) -> None:
        if not skipped:
            message = f"{source} holds no image: point --input to a folder of JPEG, PNG, BMP or TIFF photos"
        else:
            message = (f"no image in {source} could be read: all {skipped} entries were skipped, each with its "
                       f"reason in {Path(out) / 'skipped.csv'}")  # fmt: skip
        super().__init__(message)
