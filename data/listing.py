"""Which files of a folder are images to read: the walk (links, hidden entries, outputs never listed), and why an
entry is skipped."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

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

    ``dermpipe.data.manifest.list_folder`` lists the same files, and every other entry with its reason.
    """
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "no such folder"
        raise ImageReadError(f"{folder}: {what} (give the folder that holds the images)")
    return sorted(p for p in walk_files(folder) if not skip_reason(p))
