"""See and shrink the stage cache: ``dermpipe cache info`` and ``dermpipe cache prune --older-than 30``.

Safe while other runs use the cache: a prune renames each entry away before deleting it, so a run reading it either
has the whole entry or recomputes it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dermpipe.configs.schema import DEFAULT_ROOT, ROOT_LAYOUT
from dermpipe.engine.cache_admin import (
    Item,
    PruneResult,
    StageUsage,
    cache_info,
    check_cache_folder,
    human_bytes,
    human_time,
    iso_time,
    prune,
)
from dermpipe.engine.cli import run_cli

LAST_USE = "last use: an entry's modification time, refreshed when a run reuses it"


def _non_negative(kind: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of {kind}") from None
        if not value >= 0:  # also refuses nan
            raise argparse.ArgumentTypeError(f"{text!r}: give 0 or more {kind}")
        return value

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    where = argparse.ArgumentParser(add_help=False)
    group = where.add_mutually_exclusive_group()
    group.add_argument("--cache", metavar="DIR", help=f"the cache folder (default: ROOT/{ROOT_LAYOUT['cache']})")
    group.add_argument("--root", help=f"the run root whose cache to use (default: {DEFAULT_ROOT})")
    where.add_argument("--json", action="store_true", help="print one JSON object instead of tables")

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{info,prune}")
    commands.add_parser(
        "info",
        parents=[where],
        help="per stage: entries, bytes, least and most recently used",
        description=f"Per stage (the cache's first-level folders): the entries, their bytes, the least and the most "
        f"recently used ({LAST_USE}), the temporaries of writes in progress or killed; and the total.",
    )
    p = commands.add_parser(
        "prune",
        parents=[where],
        help="remove entries by stage, age or total size, and stale temporaries",
        description="Remove whole cache entries, and the temporaries killed runs left. The criteria combine: --stage "
        "limits the prune to those stages (alone, it removes all their entries), --older-than removes the entries "
        "not used for DAYS, --max-size then removes the least recently used until the stages pruned hold at most GB. "
        "With none, only stale temporaries go. Safe while other runs read and write the cache: an entry removed "
        "under a run is recomputed by it.",
    )
    p.add_argument("--older-than", type=_non_negative("days"), metavar="DAYS", help="remove entries unused for DAYS")
    p.add_argument(
        "--max-size",
        type=_non_negative("GB"),
        metavar="GB",
        help="remove the least recently used entries until the rest fits in GB (10^9 bytes)",
    )
    p.add_argument(
        "--stage", action="append", metavar="NAME", help="prune only this stage (repeatable; see `dermpipe cache info`)"
    )
    p.add_argument("--dry-run", action="store_true", help="remove nothing: list what would go and its bytes")
    p.add_argument("--list", action="store_true", help="name every file removed (a dry run always does)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: _info(args) if args.command == "info" else _prune(args))


def cache_folder(args: argparse.Namespace) -> Path:
    """--cache, else ROOT/cache; a folder that is not there is one error naming it and the flag."""
    if args.cache:
        return check_cache_folder(args.cache, "--cache")
    root = args.root or DEFAULT_ROOT
    given = f"--root {root}" if args.root else f"--root {root}, the default"
    return check_cache_folder(Path(root) / ROOT_LAYOUT["cache"], f"{given}; pass --root ROOT or --cache DIR")


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in [header, *rows]]  # fmt: skip
    return "\n".join(lines)


def _temporaries(u: StageUsage) -> str:
    return f"{u.temporaries:,} ({human_bytes(u.temporary_bytes)})" if u.temporaries else "0"


def _usage_json(u: StageUsage) -> dict[str, Any]:
    return {**u.as_dict(), "oldest": iso_time(u.oldest), "newest": iso_time(u.newest)}


def _info(args: argparse.Namespace) -> int:
    cache = cache_folder(args)
    stages = cache_info(cache)
    total = StageUsage("total")
    for u in stages:
        total.merge(u)
    if args.json:
        out = {"cache": str(cache), "stages": [_usage_json(u) for u in stages], "total": _usage_json(total)}
        print(json.dumps(out, indent=2))
        return 0
    rows = [
        [u.stage, f"{u.entries:,}", human_bytes(u.bytes), human_time(u.oldest), human_time(u.newest), _temporaries(u)]
        for u in [*stages, total]
    ]
    print(f"cache {cache} ({LAST_USE})")
    print(_table(["stage", "entries", "size", "least recently used", "most recently used", "temporaries"], rows))
    if total.temporaries:
        print("temporaries: writes in progress, or left by killed runs (`dermpipe cache prune` sweeps the stale ones)")
    return 0


def _prune(args: argparse.Namespace) -> int:
    cache = cache_folder(args)
    listing = args.list or args.dry_run
    files: list[dict[str, Any]] = []
    verb = "would remove" if args.dry_run else "removed"

    def on_remove(item: Item) -> None:
        if args.json:
            files.append({"path": item.path, "stage": item.stage, "bytes": item.bytes,
                          "last_used": iso_time(item.mtime_ns / 1e9), "temporary": item.temporary})  # fmt: skip
            return
        what = "stale temporary" if item.temporary else f"last used {human_time(item.mtime_ns / 1e9)}"
        print(f"{verb}  {item.path}  ({human_bytes(item.bytes)}, {what})")

    result = prune(
        cache,
        stages=args.stage,
        older_than_days=args.older_than,
        max_bytes=None if args.max_size is None else int(args.max_size * 1e9),
        dry_run=args.dry_run,
        on_remove=on_remove if listing else None,
    )
    if args.json:
        _print_prune_json(result, files if listing else None)
    else:
        _print_prune(result, verb)
    if result.failed:
        path, reason = result.failed[0]
        more = f" and {len(result.failed) - 1} more" if len(result.failed) > 1 else ""
        print(f"warning: could not remove {path}: {reason}{more}; the rest was pruned", file=sys.stderr)
        return 1
    return 0


def _print_prune(result: PruneResult, verb: str) -> None:
    removed, kept = result.total(result.removed), result.total(result.kept)
    temporaries = f" and {removed.temporaries:,} stale temporaries ({human_bytes(removed.temporary_bytes)})"
    print(f"{verb} {removed.entries:,} entries ({human_bytes(removed.bytes)}){temporaries} from {result.cache}; "
          f"{'would keep' if result.dry_run else 'kept'} {kept.entries:,} entries ({human_bytes(kept.bytes)}) "
          f"in the stages pruned" + (" (dry run: nothing removed)" if result.dry_run else ""))  # fmt: skip
    rows = []
    for stage in result.removed:
        r, k = result.removed[stage], result.kept[stage]
        rows.append([stage, f"{r.entries:,}", human_bytes(r.bytes), _temporaries(r), f"{k.entries:,}",
                     human_bytes(k.bytes)])  # fmt: skip
    if rows:
        gone, left = ("to remove", "to keep") if result.dry_run else ("removed", "kept")
        print(_table(["stage", gone, "size", "stale temporaries", left, "size"], rows))


def _print_prune_json(result: PruneResult, files: list[dict[str, Any]] | None) -> None:
    def side(usages: dict[str, StageUsage]) -> dict[str, Any]:
        return {"stages": [_usage_json(u) for u in usages.values()], "total": _usage_json(result.total(usages))}

    out: dict[str, Any] = {
        "cache": result.cache,
        "dry_run": result.dry_run,
        "removed": side(result.removed),
        "kept": side(result.kept),
        "failed": [{"path": p, "reason": r} for p, r in result.failed],
    }
    if files is not None:
        out["files"] = files
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
