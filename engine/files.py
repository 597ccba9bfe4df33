"""Whole-file writes that a reader never sees half done, and file digests: one implementation of each."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dermpipe.errors import DermpipeError


class FileInputError(DermpipeError):
    """A path the user gave that is missing, a folder where a file was expected, or unreadable."""


@contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it is renamed onto ``path``, else removed.

    The temporary name keeps the suffix (``.x.<pid>.tmp.png``) so libraries that pick a format by suffix still can.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when the write or the rename failed


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object], fsync: bool = False) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it into place."""
    with atomic_path(path, fsync) as tmp:
        write(tmp)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temporary name beside ``path``, then rename it: a reader never sees half a file."""
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_bytes_atomic(path: str | os.PathLike, data: bytes, fsync: bool = False) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data), fsync)


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks (caches key on content, never on paths).

    A missing path or a folder is the user's mistake (``FileInputError``); other read failures are ``OSError``.
    """
    path = Path(path)
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    except FileNotFoundError:
        raise FileInputError(f"{path}: no such file (check the path)") from None
    except IsADirectoryError:
        raise FileInputError(f"{path}: is a folder, not a file (point to the file itself)") from None
    return h.hexdigest()
