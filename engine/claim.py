"""Whether a run folder holds a finished training, an interrupted one, or one of other settings or data (named before
anything is written)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dermpipe.engine.checkpoint import (
    CheckpointError,
    resume_summary,
)
from dermpipe.engine.loop import STATE_FILE
from dermpipe.engine.rerun import Conflict, conflict, refuse_or_replace

logger = logging.getLogger(__name__)


def finished_state(run_dir: Path, fingerprint: str, warn: bool = True) -> dict[str, Any] | None:
    """The resume state of a finished run with this fingerprint, else ``None`` (saying why when ``warn``)."""
    path = run_dir / STATE_FILE
    if not path.is_file() or not (run_dir / "best.safetensors").is_file():
        return None
    try:
        state = resume_summary(path)
    except CheckpointError:
        return None
    if state.get("finished") and state.get("fingerprint") == fingerprint:
        return state
    if warn and state.get("finished"):
        logger.warning("run folder %s holds a run with other settings or data; training afresh", run_dir)
    elif warn:
        logger.warning("run folder %s holds an unfinished run; training afresh (--resume continues it)", run_dir)
    return None


def training_conflict(run_dir: Path, fingerprint: str, settings: Mapping[str, Any], what: str) -> Conflict | None:
    """The run ``run_dir`` holds (finished or not) when it was made with another fingerprint than ``fingerprint``:
    a ``Conflict`` naming the keys where its recorded settings differ from ``settings``; ``None`` when the folder
    holds no run, or one with this fingerprint."""
    path = run_dir / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = resume_summary(path)
    except CheckpointError:
        return None
    if state.get("fingerprint") == fingerprint:
        return None
    return conflict(run_dir, what, bool(state.get("finished")), state.get("settings"), settings)


def claim_run(
    run_dir: Path, fingerprint: str, settings: Mapping[str, Any], what: str, force: bool = False, resume: bool = False
) -> tuple[dict[str, Any] | None, str]:
    """Before a stage writes into ``run_dir``: refuse a run there made with other settings unless ``force``. Returns
    the finished state to reuse (``None``: train) and what the log is to say of a run that ``force`` replaces."""
    if resume:
        return None, ""  # ``fit`` refuses a resume with other settings, naming them
    note = refuse_or_replace(training_conflict(run_dir, fingerprint, settings, what), force)
    if force:
        if not note and finished_state(run_dir, fingerprint, warn=False) is not None:
            note = f"--force: retraining the finished {what} in {run_dir}"
        return None, note
    return finished_state(run_dir, fingerprint), ""


def unfinished(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds an interrupted training that ``--resume`` would continue."""
    path = run_dir / STATE_FILE
    try:
        return path.is_file() and not resume_summary(path).get("finished")
    except CheckpointError:
        return False
