"""The project's error base class (a user mistake ends a command with one ``error:`` line) and "did you mean"."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable


class DermpipeError(ValueError):
    """A mistake in what the user gave (a bad path, a corrupt file, an unknown name, a run of another stage).

    Its message names the thing and the fix; the command line prints it as ``error: <message>`` and exits with
    status 2. Every other exception (a shape mismatch, CUDA out of memory) keeps its traceback.
    """


def plain_message(error: BaseException) -> str:
    """What went wrong, in words: an ``OSError`` as ``<path>: <reason>`` (``str`` of one reads ``[Errno 28] No space
    left on device: 'x'``; no user ever needs the number), anything else as ``str(error)`` without such prefixes."""
    if isinstance(error, OSError) and error.strerror:
        where = " -> ".join(str(f) for f in (error.filename, error.filename2) if f is not None)
        return f"{where}: {error.strerror}" if where else error.strerror
    return re.sub(r"\[Errno -?\d+\] ", "", str(error))


def close_matches(name: str, choices: Iterable[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """The choices nearest to ``name`` (case-insensitive), best first: what a "did you mean" offers."""
    by_lower = {str(c).lower(): str(c) for c in choices}
    return [by_lower[m] for m in difflib.get_close_matches(name.lower(), list(by_lower), n=n, cutoff=cutoff)]


def did_you_mean(name: str, choices: Iterable[str], n: int = 3, cutoff: float = 0.6) -> str:
    """`` (did you mean 'a', 'b'?)`` for the nearest choices, or an empty string when none is near."""
    close = close_matches(name, choices, n, cutoff)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
