"""Whole-file writes that a reader never sees half done, and file digests: one implementation of each."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from dermpipe.errors import DermpipeError


class FileInputError(DermpipeError):
    """A path the user gave that is missing, a folder where a file was expected, or unreadable."""


@contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it is renamed onto ``path``, else removed.

    The temporary name keeps the suffix (``.x.h<host>.t<thread>.<pid>.tmp.png``) so libraries that pick a format by
    suffix still can.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # host and thread in the name too: two threads of one process never share a temporary, and a sweep on one
    # machine of a folder shared between machines can tell another machine's writer from a dead local one
    tmp = path.with_name(f".{path.stem}.h{_HOST}.t{threading.get_native_id()}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:  # a full or read-only disk names the file being written, not a temporary or nothing
        if error.errno is None or error.filename not in (None, str(tmp), tmp):
            raise
        raise OSError(error.errno, error.strerror, str(path)) from error
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
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError
        if not stat.S_ISREG(mode):  # a FIFO or a device would block or never end: never open one
            raise FileInputError(f"{path}: not a regular file (a FIFO, device or socket); point to an image file")
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    except FileNotFoundError:
        raise FileInputError(f"{path}: no such file (check the path)") from None
    except IsADirectoryError:
        raise FileInputError(f"{path}: is a folder, not a file (point to the file itself)") from None
    except OSError as e:  # a symlink loop, a name too long, a permission or I/O error: the input cannot be read
        raise FileInputError(f"{path}: cannot be read ({e.strerror or e})") from None
    return h.hexdigest()


class OutputPathError(DermpipeError):
    """An output path that cannot be used: a file where a folder is needed, a folder inside the input, no space."""


def check_output_folder(path: str | os.PathLike, flag: str = "--out", inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Refuse, before any work, an output folder that is a file, lies under a file, or is (inside) an input folder."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"{flag} {folder} is a file, not a folder: pass a folder (created when missing)")
    for parent in folder.absolute().parents:
        if parent.exists() and not parent.is_dir():
            raise OutputPathError(f"{flag} {folder} lies under {parent}, which is a file: pass a folder path")
    for source in inputs:
        # as written and with every link resolved: a folder reached through a link into the input is inside it too
        written = (Path(os.path.abspath(folder)), Path(os.path.abspath(source)))
        pairs = (written, (folder.resolve(), Path(source).resolve()))
        if any(inside == src or src in inside.parents for inside, src in pairs):
            raise OutputPathError(
                f"{flag} {folder} is inside the input folder {source}: a rerun would read its own outputs as "
                "inputs; pass a folder outside it"
            )
    return folder


def check_output_file(path: str | os.PathLike, flag: str = "--output") -> Path:
    """Refuse, before any work, an output file path that is a folder or lies under a file."""
    target = Path(path)
    if target.is_dir():
        raise OutputPathError(f"{flag} {target} is a folder: pass a file name, e.g. {target / 'predictions.csv'}")
    check_output_folder(target.parent, flag)
    return target


def remove_stale_temporaries(folder: str | os.PathLike, recursive: bool = True) -> int:
    """Delete the temporaries (``.<name>.<pid>.tmp<suffix>``) that killed processes left in ``folder``; those of a
    process still running are kept. Returns how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for path in folder.rglob(".*.tmp*") if recursive else folder.glob(".*.tmp*"):
        match = _TEMPORARY.fullmatch(path.name)
        if match and path.is_file() and _writer_gone(path, int(match.group(1))):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


_TEMPORARY = re.compile(r"\..+\.(\d+)\.tmp(\.[^.]*)?")
_HOSTED = re.compile(r"\..+\.h([0-9a-f]{8})\.t\d+\.\d+\.tmp(\.[^.]*)?")
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
OTHER_HOST_STALE_S = 86400.0  # another machine's temporary: its process cannot be asked, so only once a day old


def _writer_gone(path: Path, pid: int) -> bool:
    """The process that writes ``path`` is gone: a local pid that no longer runs, or another machine's temporary
    untouched for a day."""
    hosted = _HOSTED.fullmatch(path.name)
    if hosted and hosted.group(1) != _HOST:
        try:
            return time.time() - path.stat().st_mtime > OTHER_HOST_STALE_S
        except FileNotFoundError:
            return False
    return not _alive(pid)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def output_stem(image_id: str) -> str:
    """A file name for an image id that no other id shares: every character but letters, digits and ``_.-~`` is
    percent-encoded (``a/x`` -> ``a%2Fx``), so ISIC ids and plain names stay as they are."""
    return urllib.parse.quote(image_id, safe="")
