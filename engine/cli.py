"""CLI plumbing every stage script shares: the common flags, config resolution, one-line errors for user mistakes."""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from dermpipe.configs.loader import default_config_path, load_config
from dermpipe.configs.ranges import check_flags
from dermpipe.errors import DermpipeError, plain_message

T = TypeVar("T")
logger = logging.getLogger(__name__)


# A user mistake: the project's own errors, and a path that is missing, of the wrong kind or not readable (the OS
# message names it). Anything else (a shape mismatch, CUDA out of memory) is a bug and keeps its traceback.
# A full or read-only disk is not a bug either: one line naming the path.
OUTPUT_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG)
USER_ERRORS: tuple[type[BaseException], ...] = (
    DermpipeError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


def output_error(error: OSError) -> str:
    """One line for a write the disk refused (full, read-only, over quota or the file size limit): the path and the
    fix, never the errno."""
    where = f" {error.filename}" if error.filename else ""
    if error.errno == errno.EROFS:
        fix = "the disk is read-only: pass an output folder (or run.cache_dir) on a writable disk"
    else:
        fix = "free some space or pass another output folder"
    return f"cannot write{where}: {error.strerror}; {fix} (finished outputs and cache entries are intact)"


class MissingInputError(DermpipeError):
    """An input a stage reads is not there: the message names the command that makes it and the flag to point
    elsewhere."""


class CheckedParser(argparse.ArgumentParser):
    """An argument parser that range-checks the numeric flags it parsed (``--port``, ``--merge-timeout``: the table
    of configs/ranges.py): one out of range ends the command with one ``error:`` line and exit status 2."""

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        parsed = super().parse_args(args, namespace)
        try:
            check_flags(parsed)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        return parsed


def stage_parser(stage: str, description: str) -> argparse.ArgumentParser:
    """A parser with --config, --set, --device and --force; the stage adds its own flags."""
    parser = CheckedParser(description=description)
    parser.add_argument(
        "--config", default=str(default_config_path(stage)), help=f"YAML config (default: configs/{stage}.yaml)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set train.epochs=5 (repeatable)",
    )
    parser.add_argument(
        "--root",
        default=None,
        help="run root every stage reads and writes under: segmentation/, crops/, classification/<backbone>/, "
        "ensemble/, predict/, cache/ (run.root; default: runs)",
    )
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--force", action="store_true", default=None, help="recompute cached stage outputs")
    return parser


def add_follow_links(parser: argparse.ArgumentParser) -> None:
    """``--follow-links``, for the commands that list an ``--input`` folder."""
    parser.add_argument(
        "--follow-links",
        action="store_true",
        help="with --input: also read links (to files or folders) that lead out of the input folder; without it they "
        "are listed in skipped.csv, and a link to / or /usr is never searched",
    )


def resolve_config(cls: type[T], args: argparse.Namespace, flags: Mapping[str, Any]) -> T:
    """defaults < --config < --set < named flags (flags left at None do not override)."""
    common = {"run.root": args.root, "run.device": args.device, "run.force": args.force}
    return load_config(cls, args.config, args.overrides, {**common, **flags})


def run_cli(body: Callable[[], int]) -> int:
    """Run a script body; a user mistake becomes ``error: <one line>`` on stderr and exit status 2."""
    try:
        return body()
    except OSError as e:
        if e.errno in OUTPUT_ERRNOS:
            print(f"error: {output_error(e)}", file=sys.stderr)
            return 2
        if not isinstance(e, USER_ERRORS):
            raise
        fix = " (check its permissions, or pass another path)" if isinstance(e, PermissionError) else ""
        print(f"error: {plain_message(e)}{fix}", file=sys.stderr)
        return 2
    except USER_ERRORS as e:
        print(f"error: {plain_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is kept in the cache and run folder; rerun to resume", file=sys.stderr)
        return 130
