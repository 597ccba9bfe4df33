"""Sharded batch prediction: N processes (torchrun ranks, SLURM array tasks, jobs started by hand) each predict one part
of the input list into ``OUT/shards/<I>-of-<N>/``; a merge joins the parts into what one process writes over the whole
list, byte for byte (``dermpipe.predict.batch.merge_parts``).

The parts are contiguous, not strided: each part's rows are already in input order, so the merge is a concatenation
(the table, the skipped rows, the truth scores' inputs and the report's review order come out as one process's), and a
part is one range of the list. The excluded entries of a folder listing (hidden files, other formats) are split the
same way over their own sorted list, so each belongs to exactly one shard.

A part is finished when its ``part.json`` is there: written last, after the part's table (``predictions.csv``) and its
tally (``tally.json``), and removed first when the part is predicted again. It names the part (shard index and count,
its range of the inputs), the run it belongs to (a digest of the whole input list, the model, a digest of its weights,
a digest of the settings that change an output) and the command that makes it. The merge refuses a missing or
unfinished part, or a part of another run, naming the shard and that command, before it writes anything.

Under torchrun the rank waits for the other parts' ``part.json`` (no process group: the parts on disk are what the
merge needs anyway, a barrier would have to be followed by the same check of the files, and a file wait has no
collective timeout to tune nor a backend to set up; a rank that fails makes torchrun stop them all).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dermpipe.configs.loader import to_dict
from dermpipe.engine.files import write_text_atomic
from dermpipe.errors import DermpipeError

if TYPE_CHECKING:
    from dermpipe.predict.launch import Shard

logger = logging.getLogger(__name__)

SHARDS_DIR = "shards"
PART_FILE = "part.json"  # written last: the part is finished
TALLY_FILE = "tally.json"  # what the merge adds up: counts, skipped rows, report rows, truth-scoring inputs
PREDICTIONS_FILE = "predictions.csv"  # the part's rows of the table
PART_FORMAT = 1
DEFAULT_MERGE_TIMEOUT = 3600.0
# What a part must share with the others to be merged with them: the same input list and model, the same settings.
IDENTITY = ("format", "shards", "inputs", "model", "weights", "settings")
_DIFFERS = {
    "format": "it was written by another dermpipe version",
    "shards": "its shard count differs",
    "inputs": "its input list differs",
    "model": "its model differs",
    "weights": "its model's weights differ",
    "settings": "its prediction settings differ",
}
_FOLDER = re.compile(r"(\d+)-of-(\d+)")
# Config values that say where and on what a process runs, never what it predicts (the stage folders are compared by
# their weights' digest instead: a bundle unpacked at another path on another node predicts the same).
_RUN_ONLY = ("root", "out_dir", "cache_dir", "device", "force", "threads", "num_workers")
_STAGE_PATHS = ("segmentation_run", "classification_root", "ensemble_run")


class ShardError(DermpipeError):
    """A shard setting that cannot be used, or parts that cannot be merged (missing, unfinished, of another run)."""


def shard_folder(out: str | os.PathLike, index: int, count: int) -> Path:
    return Path(out) / SHARDS_DIR / f"{index}-of-{count}"


def part_range(total: int, index: int, count: int) -> tuple[int, int]:
    """The contiguous part ``index`` of ``count`` of ``total`` items: sizes differ by one at most, parts in order."""
    return total * index // count, total * (index + 1) // count


def inputs_digest(rows: Iterable[Mapping[str, str]], excluded: Iterable[Mapping[str, str]] = ()) -> str:
    """A digest of the whole input list (every manifest row, every excluded folder entry, in order)."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(dict(row), sort_keys=True).encode() + b"\n")
    h.update(b"-- excluded --\n")
    for row in excluded:
        h.update(json.dumps(dict(row), sort_keys=True).encode() + b"\n")
    return h.hexdigest()


def settings_digest(cfg: Any) -> str:
    """A digest of the prediction config without what only says where and on what a process runs."""
    settings = to_dict(cfg)
    for key in _STAGE_PATHS:
        settings.pop(key, None)
    for key in _RUN_ONLY:
        settings.get("run", {}).pop(key, None)
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shard_command(argv: Sequence[str], index: int, count: int) -> str:
    """The ``dermpipe predict`` command of one shard: ``argv`` without its shard and merge flags, then this shard's."""
    drop_value = {"--num-shards", "--shard-index", "--merge-timeout"}
    drop = {"--merge", "--no-merge"}
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in drop_value:
            skip = "=" not in arg
            continue
        if arg in drop:
            continue
        kept.append(arg)
    return "dermpipe predict " + shlex.join([*kept, "--num-shards", str(count), "--shard-index", str(index)])


def _generic_command(out: Path, index: int | str, count: int | str) -> str:
    where = shlex.quote(str(out))
    return f"dermpipe predict --input DIR --out {where} --num-shards {count} --shard-index {index}"


def merge_command(out: str | os.PathLike) -> str:
    return f"dermpipe merge --out {shlex.quote(str(out))}"


@dataclass(frozen=True)
class PartPlan:
    """What one shard predicts and the run it belongs to: ``describe`` is what its ``part.json`` starts with."""

    shard: Shard
    images: tuple[int, int]  # [start, stop) of the input rows
    total: int
    excluded: tuple[int, int]  # [start, stop) of the excluded folder entries
    excluded_total: int
    first: str  # the part's first and last image ids ("" for an empty part)
    last: str
    inputs: str
    model: str
    weights: str
    settings: str
    argv: tuple[str, ...]

    def describe(self) -> dict[str, Any]:
        start, stop = self.images
        return {
            "format": PART_FORMAT,
            "shard": self.shard.index,
            "shards": self.shard.count,
            "images": {"start": start, "stop": stop, "total": self.total, "first": self.first, "last": self.last},
            "excluded": {"start": self.excluded[0], "stop": self.excluded[1], "total": self.excluded_total},
            "inputs": self.inputs,
            "model": self.model,
            "weights": self.weights,
            "settings": self.settings,
            "command": shard_command(self.argv, self.shard.index, self.shard.count),
            "argv": list(self.argv),
        }


def plan_part(
    shard: Shard,
    rows: Sequence[Mapping[str, str]],
    excluded: Sequence[Mapping[str, str]],
    *,
    model: str,
    weights: str,
    settings: str,
    argv: Sequence[str],
) -> PartPlan:
    start, stop = shard.part(len(rows))
    return PartPlan(
        shard=shard,
        images=(start, stop),
        total=len(rows),
        excluded=shard.part(len(excluded)),
        excluded_total=len(excluded),
        first=rows[start]["image_id"] if stop > start else "",
        last=rows[stop - 1]["image_id"] if stop > start else "",
        inputs=inputs_digest(rows, excluded),
        model=model,
        weights=weights,
        settings=settings,
        argv=tuple(argv),
    )


def write_part(folder: Path, description: Mapping[str, Any]) -> Path:
    """Write ``part.json``: from here on the part is finished."""
    return write_text_atomic(folder / PART_FILE, json.dumps(description, indent=2) + "\n")


def read_part(folder: Path) -> dict[str, Any] | None:
    """The finished part in ``folder`` (its ``part.json``), or ``None`` when there is none (not started, running,
    interrupted) or it cannot be read, or the files it describes are not all there."""
    try:
        part = json.loads((folder / PART_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(part, dict) or not all((folder / f).is_file() for f in (TALLY_FILE, PREDICTIONS_FILE)):
        return None
    return part


def _same_run(part: Mapping[str, Any], reference: Mapping[str, Any]) -> str:
    """Why ``part`` is not of the run ``reference`` is, or ``""``."""
    for key in IDENTITY:
        if part.get(key) != reference.get(key):
            return _DIFFERS[key]
    for key in ("images", "excluded"):
        if (part.get(key) or {}).get("total") != (reference.get(key) or {}).get("total"):
            return _DIFFERS["inputs"]
    return ""


def finished_part(folder: Path, plan: PartPlan) -> dict[str, Any] | None:
    """The part in ``folder`` when it is finished and is this very part of this run, else ``None``."""
    part = read_part(folder)
    if part is None:
        return None
    expected = plan.describe()
    if _same_run(part, expected) or any(part.get(k) != expected[k] for k in ("shard", "images", "excluded")):
        logger.info("%s holds a part of another run: predicting this part again", folder)
        return None
    return part


def _folders(out: Path) -> dict[int, dict[int, Path]]:
    """shard count -> shard index -> folder, for every ``I-of-N`` folder under ``OUT/shards``."""
    found: dict[int, dict[int, Path]] = {}
    root = out / SHARDS_DIR
    if root.is_dir():
        for path in root.iterdir():
            match = _FOLDER.fullmatch(path.name)
            if match and path.is_dir():
                found.setdefault(int(match.group(2)), {})[int(match.group(1))] = path
    return found


def check_parts(out: str | os.PathLike, count: int | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """Every part of one sharded run under ``OUT/shards``, in shard order, each finished and of the same run; else one
    ``ShardError`` naming the first shard that is missing, unfinished or of another run, and the command that makes
    it. Reads only: a refused merge changes nothing.

    The run is the one most parts belong to (of those, the one whose part was written last when as many belong to
    another): a part left over from another run is the one named.
    """
    out = Path(out)
    root = out / SHARDS_DIR
    found = _folders(out)
    if count is None:
        if not found:
            raise ShardError(
                f"no shard parts under {root}: make them with `{_generic_command(out, 'I', 'N')}` for I = 0 to N-1 "
                f"(or under torchrun or a SLURM array), then `{merge_command(out)}`"
            )
        if len(found) > 1:
            counts = " and ".join(str(n) for n in sorted(found))
            raise ShardError(
                f"{root} holds the parts of runs in {counts} shards: pass --num-shards to say which to merge"
            )
        count = next(iter(found))
    if count < 1:
        raise ShardError(f"--num-shards must be at least 1, got {count}")
    parts = {i: read_part(shard_folder(out, i, count)) for i in range(count)}
    finished = {i: part for i, part in parts.items() if part is not None}
    ref_index = reference = None
    if finished:

        def weight(i: int) -> tuple[int, int]:
            members = sum(not _same_run(other, finished[i]) for other in finished.values())
            return members, (shard_folder(out, i, count) / PART_FILE).stat().st_mtime_ns

        ref_index = max(finished, key=weight)
        reference = finished[ref_index]
    same = [i for i in sorted(finished) if reference is not None and not _same_run(finished[i], reference)]

    def command(i: int) -> str:
        if reference is not None and isinstance(reference.get("argv"), list):
            return shard_command([str(a) for a in reference["argv"]], i, count)
        return _generic_command(out, i, count)

    for i in range(count):
        if parts[i] is None:
            folder = shard_folder(out, i, count)
            state = "unfinished (still running, or interrupted)" if folder.is_dir() else "missing"
            raise ShardError(f"shard {i} of {count} is {state}: {folder / PART_FILE} not found; make it with "
                             f"`{command(i)}`, then merge again")  # fmt: skip
    assert reference is not None
    for i in range(count):
        part = parts[i]
        assert part is not None
        why = _same_run(part, reference)
        if not why and (part.get("shard") != i or part.get("shards") != count):
            why = "its part.json names another shard"
        if why:
            others = ", ".join(str(j) for j in same)
            raise ShardError(
                f"shard {i} of {count} ({shard_folder(out, i, count)}) is a part of another run than shard"
                f"{'s' if len(same) > 1 else ''} {others}: {why}; make it again with `{command(i)}`, then merge again"
            )
    for i in range(count - 1):  # contiguous parts, in order, covering the list
        this, after = parts[i], parts[i + 1]
        assert this is not None and after is not None
        for key in ("images", "excluded"):
            if this[key]["stop"] != after[key]["start"]:
                raise ShardError(f"shard {i + 1} of {count}'s part does not follow shard {i}'s: make it again with "
                                 f"`{command(i + 1)}`, then merge again")  # fmt: skip
    return [(shard_folder(out, i, count), parts[i]) for i in range(count)]  # type: ignore[misc]


def wait_for_parts(
    out: str | os.PathLike, plan: PartPlan, timeout: float = DEFAULT_MERGE_TIMEOUT, poll: float = 1.0
) -> None:
    """Wait until every part of ``plan``'s run is finished under ``OUT/shards`` (a part of another run left there by
    an earlier run is waited on: its shard replaces it); ``ShardError`` after ``timeout`` seconds."""
    out = Path(out)
    count = plan.shard.count
    expected = plan.describe()
    deadline = time.monotonic() + timeout
    said = False
    while True:
        waiting = []
        for i in range(count):
            part = read_part(shard_folder(out, i, count))
            if part is None or _same_run(part, expected) or part.get("shard") != i:
                waiting.append(i)
        if not waiting:
            return
        if time.monotonic() >= deadline:
            i = waiting[0]
            raise ShardError(
                f"shard {i} of {count} did not finish within {timeout:g} s ({shard_folder(out, i, count) / PART_FILE}"
                f" not there): once every shard has finished, merge with `{merge_command(out)}` (its command: "
                f"`{shard_command(plan.argv, i, count)}`)"
            )
        if not said:
            logger.info("%s: waiting for %d shards to finish (up to %g s)", plan.shard.name, len(waiting), timeout)
            said = True
        time.sleep(poll)
