"""What a stage cache holds and how to shrink it, safely while other processes read and write it.

The cache (engine/cache.py) keeps one file per entry, ``<cache>/<stage>/ab/<key>.npz``; writers put a temporary
``.<key>.npz.<pid>.tmp.npz`` beside it and rename it into place. An entry's modification time is its last use (a hit
refreshes it, at most hourly). Here:

- ``cache_info``: per stage, the entries, their bytes, the least and the most recently used, and the temporaries.
- ``prune``: removes whole entries (of some stages, unused for some days, the least recently used until the cache
  fits a size) and the stale temporaries killed runs left. An entry is renamed to a temporary name in its own
  folder (atomic), then deleted: a reader that already opened it reads it whole, a reader that comes after finds no
  entry and recomputes (``StageCache.get`` treats a vanished entry as a miss). A prune killed between the two steps
  leaves a temporary that the next prune, or the next run of that stage, sweeps. Folders are never removed: a
  writer may be about to put a temporary in one.

Both walk the cache with ``os.scandir`` and keep no list of paths, so a cache of millions of entries costs a few
numbers per entry (``--max-size`` walks twice: once to find the cut-off, once to remove).
"""

from __future__ import annotations

import os
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from dermpipe.engine.files import _TEMPORARY, _alive  # the one naming of temporaries, and "is that writer alive"
from dermpipe.errors import DermpipeError, did_you_mean

DAY_S = 86400.0
# A temporary is a write in progress unless its process is gone AND it has not changed for this long (another
# machine sharing the cache has other process ids), or it has not changed for a day (a process id reused since).
TEMPORARY_GRACE_S = 600.0
TEMPORARY_ABANDONED_S = DAY_S


class CacheFolderError(DermpipeError):
    """The cache folder given (or implied by the run root) does not exist or is not a folder."""


class UnknownStageError(DermpipeError):
    """A stage named that the cache has no folder for."""


class Item(NamedTuple):
    """One file of the cache: an entry or a temporary."""

    stage: str
    path: str
    bytes: int
    mtime_ns: int  # an entry's last use
    temporary: bool


@dataclass
class StageUsage:
    """One stage's share of the cache (or the total, ``stage == "total"``)."""

    stage: str
    entries: int = 0
    bytes: int = 0
    oldest: float | None = None  # least recent last use (seconds since the epoch)
    newest: float | None = None  # most recent last use
    temporaries: int = 0
    temporary_bytes: int = 0

    def add(self, item: Item) -> None:
        if item.temporary:
            self.temporaries += 1
            self.temporary_bytes += item.bytes
            return
        self.entries += 1
        self.bytes += item.bytes
        t = item.mtime_ns / 1e9
        self.oldest = t if self.oldest is None else min(self.oldest, t)
        self.newest = t if self.newest is None else max(self.newest, t)

    def merge(self, other: StageUsage) -> None:
        self.entries += other.entries
        self.bytes += other.bytes
        self.temporaries += other.temporaries
        self.temporary_bytes += other.temporary_bytes
        for t in (other.oldest, other.newest):
            if t is not None:
                self.oldest = t if self.oldest is None else min(self.oldest, t)
                self.newest = t if self.newest is None else max(self.newest, t)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PruneResult:
    """What a prune removed (or, with ``dry_run``, would remove) per stage, and what it kept."""

    cache: str
    dry_run: bool
    removed: dict[str, StageUsage] = field(default_factory=dict)  # entries and stale temporaries, per stage
    kept: dict[str, StageUsage] = field(default_factory=dict)  # entries left in the stages pruned
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of files that could not be removed

    def total(self, which: dict[str, StageUsage]) -> StageUsage:
        total = StageUsage("total")
        for usage in which.values():
            total.merge(usage)
        return total


# ---- finding the cache and walking it


def check_cache_folder(path: str | os.PathLike, how: str) -> Path:
    """``path`` as a folder, else one error naming it and ``how`` it was given (e.g. ``--cache``)."""
    folder = Path(path)
    if not folder.exists():
        raise CacheFolderError(f"cache folder {folder} does not exist ({how})")
    if not folder.is_dir():
        raise CacheFolderError(f"cache folder {folder} is a file, not a folder ({how})")
    return folder


def cache_stages(cache: str | os.PathLike) -> list[str]:
    """The stages a cache holds: its first-level folders, sorted."""
    with os.scandir(cache) as it:
        return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir(follow_symlinks=False))


def check_stages(cache: str | os.PathLike, names: Iterable[str]) -> list[str]:
    """``names`` if the cache holds each, else an error naming the stages it does hold (and the nearest)."""
    present = cache_stages(cache)
    for name in names:
        if name not in present:
            held = ", ".join(present) if present else "none"
            raise UnknownStageError(
                f"no stage {name!r} in cache {cache}{did_you_mean(name, present)}; stages present: {held}"
            )
    return list(dict.fromkeys(names))


def _files(folder: str) -> Iterator[os.DirEntry]:
    """Every regular file under ``folder`` (symlinks not followed); folders vanishing meanwhile are skipped."""
    stack = [folder]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except (FileNotFoundError, NotADirectoryError):
            continue
        with it:
            for entry in it:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        yield entry
                except OSError:
                    continue


def scan(cache: str | os.PathLike, stages: Iterable[str] | None = None) -> Iterator[Item]:
    """The entries and temporaries of ``stages`` (default: every stage); other hidden files are left out."""
    for stage in cache_stages(cache) if stages is None else stages:
        for entry in _files(os.path.join(cache, stage)):
            temporary = entry.name.startswith(".")
            if temporary and not _TEMPORARY.fullmatch(entry.name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:  # removed since the folder was listed
                continue
            yield Item(stage, entry.path, st.st_size, st.st_mtime_ns, temporary)


def cache_info(cache: str | os.PathLike) -> list[StageUsage]:
    """Per stage (sorted), the entries, bytes, least and most recently used, and temporaries."""
    usage = {stage: StageUsage(stage) for stage in cache_stages(cache)}
    for item in scan(cache, list(usage)):
        usage[item.stage].add(item)
    return list(usage.values())


def is_stale_temporary(name: str, mtime: float, now: float | None = None) -> bool:
    """A temporary no writer will rename: its process is gone and it is quiet for a while, or it is a day old."""
    match = _TEMPORARY.fullmatch(name)
    if not match:
        return False
    age = (time.time() if now is None else now) - mtime
    return age >= TEMPORARY_ABANDONED_S or (age >= TEMPORARY_GRACE_S and not _alive(int(match.group(1))))


# ---- removing


def remove_entry(path: str | os.PathLike) -> bool:
    """Take one entry out of the cache so that no reader sees it half gone; ``False`` if it was already gone.

    It is renamed to a temporary name in its own folder (one atomic step: a reader opening the old name from now on
    misses and recomputes; one that has it open keeps reading the whole file), then the temporary is deleted.
    """
    path = Path(path)
    trash = path.with_name(f".{path.name}.{os.getpid()}.tmp.trash")
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return False
    _discard(trash)
    return True


def _discard(trash: Path) -> None:
    """Delete an entry already renamed out of the cache (a separate step, so tests can act in between)."""
    trash.unlink(missing_ok=True)


def _least_recently_used(times: array, sizes: array, max_bytes: int) -> tuple[int, int]:
    """Which entries go so that the rest fits in ``max_bytes``, the least recently used first: all last used before
    the returned time, and the returned number of those last used at it."""
    t, b = np.frombuffer(times, dtype=np.int64), np.frombuffer(sizes, dtype=np.int64)
    order = np.argsort(t, kind="stable")
    freed = np.cumsum(b[order])
    count = int(np.searchsorted(freed, int(b.sum()) - max_bytes, side="left")) + 1
    last = int(t[order[count - 1]])
    return last, int(np.count_nonzero(t[order[:count]] == last))


def prune(
    cache: str | os.PathLike,
    *,
    stages: Iterable[str] | None = None,
    older_than_days: float | None = None,
    max_bytes: int | None = None,
    dry_run: bool = False,
    now: float | None = None,
    on_remove: Callable[[Item], None] | None = None,
) -> PruneResult:
    """Remove whole entries of ``stages`` (default: every stage) and their stale temporaries.

    An entry goes when every criterion given picks it, in this order: ``stages`` alone removes every entry of those
    stages; ``older_than_days`` the entries not used for that many days; then ``max_bytes`` the least recently used
    of those left until the stages pruned hold at most that many bytes. With no criterion only stale temporaries go.
    ``dry_run`` removes nothing and reports what would go; ``on_remove`` is called with each file removed.
    """
    cache = os.fspath(cache)
    names = cache_stages(cache) if stages is None else check_stages(cache, stages)
    now = time.time() if now is None else now
    cutoff_ns = None if older_than_days is None else int((now - older_than_days * DAY_S) * 1e9)
    everything = stages is not None and older_than_days is None and max_bytes is None
    result = PruneResult(cache, dry_run)
    result.removed = {s: StageUsage(s) for s in names}
    result.kept = {s: StageUsage(s) for s in names}

    def picked_by_age(item: Item) -> bool:
        return everything or (cutoff_ns is not None and item.mtime_ns < cutoff_ns)

    def remove(item: Item) -> None:
        if not dry_run:
            try:
                if item.temporary:
                    os.unlink(item.path)
                elif not remove_entry(item.path):
                    return  # gone meanwhile (another prune, a corrupt entry cleared by a reader)
            except FileNotFoundError:
                return
            except OSError as e:
                result.failed.append((item.path, e.strerror or str(e)))
                return
        result.removed[item.stage].add(item)
        if on_remove is not None:
            on_remove(item)

    # pass 1: stale temporaries, entries picked by stage or age; the others' last use and size for --max-size
    times, sizes = array("q"), array("q")
    for item in scan(cache, names):
        if item.temporary:
            if is_stale_temporary(os.path.basename(item.path), item.mtime_ns / 1e9, now):
                remove(item)
        elif picked_by_age(item):
            remove(item)
        else:
            result.kept[item.stage].add(item)
            if max_bytes is not None:
                times.append(item.mtime_ns)
                sizes.append(item.bytes)
    if max_bytes is None or sum(sizes) <= max_bytes:
        return result

    last, ties = _least_recently_used(times, sizes, max_bytes)
    del times, sizes

    # pass 2: remove them (entries written or used since pass 1 are newer than `last` and stay)
    result.kept = {s: StageUsage(s) for s in names}
    for item in scan(cache, names):
        if item.temporary or picked_by_age(item):
            continue  # dealt with in pass 1 (still here on a dry run)
        if item.mtime_ns < last or (item.mtime_ns == last and ties > 0):
            if item.mtime_ns == last:
                ties -= 1
            remove(item)
        else:
            result.kept[item.stage].add(item)
    return result


# ---- sizes and times for people


def human_bytes(n: float) -> str:
    """Decimal units, as ``--max-size`` takes them: 950 B, 12.3 kB, 4.6 MB, 1.2 GB."""
    if abs(n) < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if abs(n) < 1000 or unit == "TB":
            break
    return f"{n:.1f} {unit}"


def human_time(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def iso_time(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
