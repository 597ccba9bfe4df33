"""Content-addressed stage cache: per-item entries keyed by input bytes, settings, model and upstream keys.

Like MONAI's ``PersistentDataset`` but with its two traps avoided: the key hashes the image *bytes* (not the path) and
the transform settings. Entries are written to a temporary name and renamed, every entry carries its key and a digest
of its key, metadata and arrays, and an entry that fails to load or to verify (another key, an edited metadata value,
a changed array) is recomputed and counted as corrupt, never trusted. Something other than a file where an entry
belongs (a folder, a FIFO) is removed and the entry recomputed. Entries of the earlier format (a digest of the arrays
alone) miss and are recomputed.

An entry's modification time is its last use: a hit refreshes it (at most once per ``TOUCH_AFTER_S``), so
``dermpipe cache prune --older-than DAYS`` (engine/cache_admin.py) removes what no run used for DAYS. A prune renames
an entry away before deleting it: a reader that already opened it reads it whole, one that comes after misses and
recomputes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import shutil
import stat
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dermpipe.engine.cache_admin import CacheFolderError
from dermpipe.engine.files import remove_stale_temporaries, write_bytes_atomic

logger = logging.getLogger(__name__)

VERSIONED_LIBRARIES = (
    "torch",
    "timm",
    "segmentation-models-pytorch",
    "albumentations",
    "opencv-python-headless",
    "numpy",
    "scikit-image",
    "dermpipe",
)
_SWEPT: set[Path] = set()  # stage folders already cleared of stale temporaries in this process
_DIGEST = "__digest__"
_META = "__meta__"
_KEY = "__key__"  # the key the entry was stored under: an entry copied or renamed to another key never verifies
_RESERVED = (_DIGEST, _META, _KEY)
# A hit refreshes the entry's modification time (its last use) when it is older than this: one utime per entry per
# hour at most, not one per read (a training run reads every resized image once per epoch).
TOUCH_AFTER_S = 3600.0


@functools.cache
def _installed_versions() -> tuple[tuple[str, str], ...]:
    out = []
    for name in VERSIONED_LIBRARIES:
        try:
            out.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            out.append((name, "absent"))
    return tuple(out)


def user_cache_dir() -> Path:
    """The user's own cache folder for the stage cache of commands that have no run root (``predict --model``,
    ``serve``): platformdirs' user cache folder (``~/.cache/dermpipe`` on Linux, ``XDG_CACHE_HOME`` moves it;
    ``~/Library/Caches/dermpipe`` on macOS; ``%LOCALAPPDATA%\\dermpipe\\Cache`` on Windows)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("dermpipe", appauthor=False))


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries whose change can change a stage's output (read once per process)."""
    return dict(_installed_versions())


def _canonical(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, np.ndarray):
        return {"ndarray": hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest(), "shape": value.shape}
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return repr(value)


def stage_key(
    stage: str,
    *,
    inputs: str | Iterable[str] = (),
    settings: Mapping[str, Any] | None = None,
    model: str | None = None,
    upstream: Iterable[str] = (),
    versions: Mapping[str, str] | None = None,
) -> str:
    """The cache key of one stage output: a sha256 over everything that can change it.

    ``inputs``: content digests of the input files (never their paths); ``settings``: the options that change the
    output (include an albumentations transform's ``to_dict``); ``model``: the digest of the weights that made it;
    ``upstream``: keys of the stage outputs it was computed from; ``versions``: library versions (default: installed).
    """
    payload = {
        "stage": stage,
        "inputs": [inputs] if isinstance(inputs, str) else list(inputs),
        "settings": _canonical(settings or {}),
        "model": model,
        "upstream": list(upstream),
        "versions": dict(versions if versions is not None else library_versions()),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the arrays' names, dtypes, shapes and bytes (in name order)."""
    return _update_arrays(hashlib.sha256(), arrays).hexdigest()


def entry_digest(key: str, meta_json: str, arrays: Mapping[str, np.ndarray]) -> str:
    """The digest an entry carries: its key, its metadata (the JSON text stored) and its arrays, each length-framed,
    so no change to any of the three (a swapped entry, an edited box, permuted probabilities) verifies."""
    h = hashlib.sha256(b"dermpipe-cache-entry-v2|")
    for part in (key.encode(), meta_json.encode()):
        h.update(f"{len(part)}|".encode())
        h.update(part)
    return _update_arrays(h, arrays).hexdigest()


def _update_arrays(h: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h


def _touch(path: Path) -> None:
    """Mark an entry used now (its modification time); a read-only cache or an entry pruned meanwhile stays as is."""
    with contextlib.suppress(OSError):
        os.utime(path)


def _unlink_if_same(path: Path, found: os.stat_result) -> None:
    """Delete the corrupt file that was read, not an entry another process has put in its place since."""
    with contextlib.suppress(FileNotFoundError):
        now = path.stat()
        if (now.st_dev, now.st_ino) == (found.st_dev, found.st_ino):
            path.unlink()


class _OldFormat(Exception):
    """An entry written before entries carried their key: a plain miss, recomputed and replaced."""


class StageCache:
    """Per-item entries of one stage under ``root/stage/ab/<key>.npz``: one file each.

    ``get`` returns ``None`` on a miss or a corrupt entry (which it deletes), so callers recompute, and marks a hit
    used (the file's modification time); ``put`` writes atomically, replacing whatever non-file stands at the entry's
    path. ``force=True`` ignores existing entries (and overwrites them). ``reused``/``computed``/``corrupt`` count per
    run (a corrupt entry recomputed counts in both ``corrupt`` and ``computed``).
    """

    def __init__(self, root: str | os.PathLike, stage: str, force: bool = False) -> None:
        self.root = Path(root) / stage
        self.stage = stage
        self.force = force
        if self.root not in _SWEPT:  # entries a killed run left half-written; one walk of the folder per process
            _SWEPT.add(self.root)
            remove_stale_temporaries(self.root)
        self.reused = 0
        self.computed = 0
        self.corrupt = 0

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npz"

    def __contains__(self, key: str) -> bool:
        return not self.force and self.path(key).is_file()

    def get(self, key: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """``(arrays, meta)`` of a valid entry, else ``None``; counts a hit as reused."""
        if self.force:
            return None
        path = self.path(key)
        try:
            found = path.stat()
        except OSError:  # no entry (or no folder for it yet): a miss
            return None
        if not stat.S_ISREG(found.st_mode):  # a folder, FIFO or socket where the entry belongs: never opened
            logger.warning("cache: %s is not a file; replacing it with a recomputed entry", path)
            self.corrupt += 1
            self._clear(path)
            return None
        try:
            with np.load(path, allow_pickle=False) as npz:  # once open, a prune that renames it away cannot cut it
                if _KEY not in npz.files:
                    raise _OldFormat
                arrays = {k: npz[k] for k in npz.files if k not in _RESERVED}
                digest, stored_key, meta_json = str(npz[_DIGEST]), str(npz[_KEY]), str(npz[_META])
            if stored_key != key:
                raise ValueError(f"entry of another key {stored_key[:12]}")
            if digest != entry_digest(key, meta_json, arrays):
                raise ValueError("digest mismatch (key, metadata or arrays changed)")
            meta = json.loads(meta_json)
        except FileNotFoundError:  # pruned between the stat and the open: a plain miss, recomputed
            return None
        except _OldFormat:
            logger.debug("cache: %s is of an earlier format; recomputing", path)
            return None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as e:
            logger.warning("cache: corrupt entry %s (%s); recomputing", path, e)
            self.corrupt += 1
            _unlink_if_same(path, found)
            return None
        self.reused += 1
        if time.time() - found.st_mtime >= TOUCH_AFTER_S:
            _touch(path)
        return arrays, meta

    def put(self, key: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None) -> Path:
        """Store an entry atomically: write a temporary file in the same folder, then rename it into place."""
        path = self.path(key)
        self._clear(path)
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        reserved = sorted(set(arrays) & set(_RESERVED))
        if reserved:
            raise ValueError(f"array names {reserved} are reserved by the cache")
        meta_json = json.dumps(meta or {})
        stored = {_DIGEST: entry_digest(key, meta_json, arrays), _META: meta_json, _KEY: key}
        buf = io.BytesIO()
        np.savez(buf, **arrays, **{k: np.array(v) for k, v in stored.items()})
        write_bytes_atomic(path, buf.getvalue(), fsync=True)
        self.computed += 1
        return path

    def _clear(self, path: Path) -> None:
        """Make room for an entry at ``path``: a non-file there (a folder, a FIFO, a socket) or a non-folder where
        its ``ab/`` folder belongs is removed (a folder only when it lies inside this stage's folder). A file, or a
        link, at ``path`` is left for the atomic rename to replace."""
        with contextlib.suppress(FileNotFoundError):
            # exists() first: another process (a torchrun rank) may make the folder between the two looks
            if path.parent.exists() and not path.parent.is_dir():
                path.parent.unlink()
            if stat.S_ISDIR(path.lstat().st_mode):
                if self.root.resolve() not in path.resolve().parents:
                    raise CacheFolderError(
                        f"the cache entry {path} is a folder outside the cache folder {self.root}: remove it, or "
                        "set run.cache_dir to another folder"
                    )
                shutil.rmtree(path)
            elif not stat.S_ISREG(path.stat().st_mode):
                path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)

    def get_or_compute(
        self,
        key: str,
        compute: Callable[[], tuple[Mapping[str, np.ndarray], Mapping[str, Any]] | Mapping[str, np.ndarray]],
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The cached entry, or ``compute()`` stored under ``key`` and returned."""
        hit = self.get(key)
        if hit is not None:
            return hit
        result = compute()
        arrays, meta = result if isinstance(result, tuple) else (result, {})
        self.put(key, arrays, meta)
        return {k: np.asarray(v) for k, v in arrays.items()}, dict(meta)

    def summary(self) -> str:
        extra = f", {self.corrupt} corrupt recomputed" if self.corrupt else ""
        return f"cache: {self.reused} reused, {self.computed} computed{extra} ({self.stage})"

    def log_summary(self) -> None:
        logger.info(self.summary())
