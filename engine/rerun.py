"""A finished run is never replaced unasked: the settings a run was made with, recorded beside it as dotted keys, and
the one line that refuses a rerun with other settings, naming each key that differs (old -> new).

A stage records ``recorded_settings(...)`` with its finished or resume state; before it writes anything it compares
them with the settings it is about to use. A difference is a ``Conflict``: refused (``RerunError``) unless ``--force``,
when the log says that the run is being replaced.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dermpipe.engine.files import file_digest
from dermpipe.errors import DermpipeError

logger = logging.getLogger(__name__)

MANIFEST_DIGEST = "data.manifest digest"  # the recorded key of the manifest's content digest
_DIGEST = re.compile(r"[0-9a-f]{64}")


class RerunError(DermpipeError):
    """A run folder holds a run made with other settings or data: replacing it needs ``--force``."""


def flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted keys (``{"train": {"epochs": 6}}`` -> ``{"train.epochs": 6}``); lists stay lists."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def recorded_settings(payload: Mapping[str, Any], manifest: str | os.PathLike | None = None) -> dict[str, Any]:
    """What a run records of its settings: ``payload`` as dotted keys (JSON-plain values), plus the content digest
    of ``manifest`` (its bytes decide the weights as much as any setting)."""
    flat = json.loads(json.dumps(flatten(payload), default=str))
    if manifest:
        flat[MANIFEST_DIGEST] = file_digest(manifest)
    return flat


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, str) and _DIGEST.fullmatch(value):
        return f"{value[:4]}.."
    return value if isinstance(value, str) else json.dumps(value)


def differences(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """``key old -> new`` for every dotted key whose value differs (a key on one side only shows ``(unset)``)."""
    if old is None:
        return []
    missing = object()
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            out.append(f"{key} {'(unset)' if a is missing else _show(a)} -> {'(unset)' if b is missing else _show(b)}")
    return out


@dataclass(frozen=True)
class Conflict:
    """A folder holding a run made with other settings: ``what`` it holds (``U-Net``, ``resnet18 classifier``,
    ``vote``), whether that run had finished, and the differing keys (``None``: the folder records no settings), or
    instead a ``reason`` (e.g. that its inputs are about to be remade)."""

    folder: Path
    what: str
    finished: bool
    keys: tuple[str, ...] | None
    reason: str = ""

    def line(self) -> str:
        """One line naming the folder, what it holds and every differing key."""
        if self.reason:
            return f"{self.folder} holds {'a finished' if self.finished else 'an unfinished'} {self.what} {self.reason}"
        state = f"a finished {self.what} made" if self.finished else f"an unfinished {self.what} training started"
        if self.keys is None:
            why = "with other settings (this older run folder does not record which)"
        elif self.keys:
            why = f"with other settings: {', '.join(self.keys)}"
        else:
            why = "with other settings or data"
        return f"{self.folder} holds {state} {why}"


FIX = "pass --force to replace it, or choose another --out/--root"


def conflict(
    folder: Path, what: str, finished: bool, old: Mapping[str, Any] | None, new: Mapping[str, Any]
) -> Conflict:
    keys = None if old is None else tuple(differences(old, new))
    return Conflict(Path(folder), what, finished, keys)


def refuse_or_replace(found: Conflict | None, force: bool) -> str:
    """Refuse ``found`` (``RerunError``, one line naming the keys and the two ways on) unless ``force``; returns
    the line the run's log then gives (``""``: nothing is replaced), to log once the run folder's log is open."""
    if found is None:
        return ""
    if not force:
        raise RerunError(f"{found.line()}; {FIX}")
    return f"--force: replacing what {found.folder} holds ({found.line().split(' holds ', 1)[1]})"


def refuse_all(found: Iterable[Conflict | str], force: bool, fix: str = "choose another --root") -> None:
    """Refuse every conflict at once: one alone as the error line itself; several each on a line of its own
    (stderr), then the one error line. With ``force`` the log names each run being replaced instead."""
    lines = [item.line() if isinstance(item, Conflict) else item for item in found]
    if force:
        for line in lines:
            logger.warning("--force: replacing it: %s", line)
        return
    if len(lines) == 1:
        raise RerunError(f"{lines[0]}; pass --force to replace it, or {fix}")
    for line in lines:
        print(line, file=sys.stderr)
    if lines:
        raise RerunError(
            f"the {len(lines)} stage folders above hold runs made with other settings or data; nothing was trained: "
            f"pass --force to replace them, or {fix}"
        )
