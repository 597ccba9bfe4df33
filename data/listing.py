"""What a prediction command was given: a manifest, or a folder listed as one (``list_folder``: which entries are
images to read, and why each other one is skipped: links, hidden entries, outputs never listed)."""

from __future__ import annotations

import os
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dermpipe.data.manifest import Manifest, ManifestError
from dermpipe.data.reading import (
    _OTHER_FORMATS,
    IMAGE_EXTENSIONS,
    MASK_SUFFIXES,
    TAKEN_FORMATS,
    ImageReadError,
    file_problem,
)


def mask_name_suffix(path: str | os.PathLike) -> str:
    """The ``MASK_SUFFIXES`` ending of the file's stem (``"_lesion"`` for ``IMD002_lesion.bmp``), or ``""``."""
    stem = Path(path).stem.lower()
    return next((suffix for suffix in MASK_SUFFIXES if stem.endswith(suffix)), "")


def format_problem(path: str | os.PathLike) -> str:
    """Why the reader does not take a file of this name's extension (``<what> (<fix>)``), or ``""`` when it does."""
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return ""
    if not suffix:
        return f"no file extension (the reader takes {TAKEN_FORMATS}: add the extension of its format)"
    if suffix in _OTHER_FORMATS:
        name = _OTHER_FORMATS[suffix]
        return f"{name} images are not read (convert it to JPEG or PNG; the reader takes {TAKEN_FORMATS})"
    return f"'{suffix}' files are not images the reader takes ({TAKEN_FORMATS})"


def skip_reason(path: str | os.PathLike, mask_names: bool = True) -> str:
    """Why a folder listing leaves ``path`` out, from its name and ``os.stat`` alone (it is never opened), or ``""``.

    The reasons, in order: what ``file_problem`` finds (missing, broken link, link loop, FIFO, device, socket,
    empty, too large), an extension the reader does not take, and, with ``mask_names``, a name that ends like a
    mask file (``MASK_SUFFIXES``). Each says how to include the file.
    """
    path = Path(path)
    problem, _ = file_problem(path)
    if problem:
        return problem
    if problem := format_problem(path):
        return problem
    suffix = mask_name_suffix(path) if mask_names else ""
    if suffix:
        renamed = path.stem[: -len(suffix)] + suffix.replace("_", "-") + path.suffix
        return (
            f"name ends with '{suffix}', which marks a lesion mask or map beside its image, not a photo (to include "
            f"it, rename it so the name does not end with '{suffix}', e.g. '{renamed}')"
        )
    return ""


def within(path: str | os.PathLike, root_real: str) -> bool:
    """Whether ``path``, links resolved, is the folder ``root_real`` (itself resolved) or lies under it."""
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def outside_reason(path: str | os.PathLike, folder: bool = False) -> str:
    """The reason a folder listing gives for a link (to a file, or with ``folder`` to a folder) that resolves outside
    the folder it lists: not read unless ``--follow-links`` allows it."""
    real = os.path.realpath(path)
    if folder:
        return f"link to a folder outside the input folder ({real}): not searched (pass --follow-links to search it)"
    return f"link to a file outside the input folder ({real}): not read (pass --follow-links to read it)"


def walk_files(
    root: str | os.PathLike,
    skip: Callable[[str], bool] = lambda name: name.startswith("."),
    follow_links: bool = False,
    excluded: list[tuple[Path, str]] | None = None,
) -> list[Path]:
    """Every file under ``root`` in a fixed order, leaving out names ``skip`` rejects.

    Folder links are followed once each (a link loop never walks forever), and only where they resolve inside
    ``root``: a link to ``/`` or to another disk is not searched, and a file link resolving outside ``root`` is not
    listed; each such entry is added to ``excluded`` with its reason. ``follow_links`` follows and lists them too.
    """
    root_real = os.path.realpath(root)
    found: list[Path] = []
    visited: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:  # a symlink loop would otherwise walk forever
            dirs[:] = []
            continue
        visited.add(real)
        kept = []
        for name in sorted(d for d in dirs if not skip(d)):
            path = Path(folder) / name
            if follow_links or within(path, root_real):
                kept.append(name)
            elif excluded is not None:
                excluded.append((path, outside_reason(path, folder=True)))
        dirs[:] = kept
        for name in sorted(f for f in files if not skip(f)):
            path = Path(folder) / name
            if follow_links or not os.path.exists(path) or within(path, root_real):  # a broken link: its reader says
                found.append(path)
            elif excluded is not None:
                excluded.append((path, outside_reason(path)))
    return found


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder``, recursively and sorted, without hidden entries and what ``skip_reason`` names
    (mask files by name, other formats, special files, empty or too large files).

    ``list_folder`` lists the same files, and every other entry with its reason.
    """
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "no such folder"
        raise ImageReadError(f"{folder}: {what} (give the folder that holds the images)")
    return sorted(p for p in walk_files(folder) if not skip_reason(p))


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
