"""Outputs are confined: no command writes inside a finished run folder or a model bundle.

``predict``, ``segment``, ``merge`` and ``serve`` write where the user points them (``--out``, ``--output``,
``--upload-dir``). A path that resolves (symlinks followed) into a bundle or a finished run would replace the files
that make it what it is (``predict --output runs/x/bundle/bundle.json`` once replaced a bundle's manifest with a CSV;
``--output runs/x/segmentation/metrics.csv`` destroyed the U-Net's training history). ``confine_output`` walks up
from the path and refuses, before anything is written, with one line naming the finished folder and the fix.

What makes a folder finished, by the files in it:

- a bundle: ``bundle.json`` and ``SHA256SUMS``;
- a training run (U-Net, backbone, vote): ``best.safetensors``, ``last.safetensors``, ``meta.safetensors``,
  ``last_state.pt`` or ``summary.json``;
- a crops folder: ``crops.csv`` (the crops the classifiers train on).

A run root (``summary.md``, or a stage folder of the root's layout that is one of the above) holds outputs of its
own beside its stage folders (``ROOT/predict``, the demo's ``predictions.csv`` and report): only its summary table is
refused as an output file.

A command may write into a finished folder of its own kind where that is its rerun (``segment --out ROOT/crops``).
"""

from __future__ import annotations

import os
from pathlib import Path

from dermpipe.configs.schema import ROOT_LAYOUT
from dermpipe.engine.files import OutputPathError

BUNDLE_MARKERS = ("bundle.json", "SHA256SUMS")  # both
RUN_MARKERS = ("best.safetensors", "last.safetensors", "meta.safetensors", "last_state.pt", "summary.json")
CROPS_MARKER = "crops.csv"
ROOT_MARKER = "summary.md"


def _finished_kind(folder: Path) -> str | None:
    """What finished thing ``folder`` holds: ``bundle``, ``run`` (a training run), ``crops``, or ``None``."""
    if all((folder / name).is_file() for name in BUNDLE_MARKERS):
        return "bundle"
    if any((folder / name).is_file() for name in RUN_MARKERS):
        return "run"
    if (folder / CROPS_MARKER).is_file():
        return "crops"
    return None


def _is_run_root(folder: Path) -> bool:
    if (folder / ROOT_MARKER).is_file():
        return True
    return any(_finished_kind(folder / sub) is not None for sub in ROOT_LAYOUT.values() if sub != "cache")


_WHAT = {"bundle": "a model bundle", "run": "a finished training run", "crops": "a finished crops folder"}


def finished_folder(path: str | os.PathLike, *, is_file: bool = False, own: str | None = None) -> str | None:
    """Why ``path`` (a folder to write into, or with ``is_file`` a file to write) may not be written, or ``None``:
    the finished folder it resolves into and what that folder is. ``own``: the kind of finished folder the command
    itself makes (``crops`` for ``segment``), allowed as the output folder itself."""
    target = Path(path).resolve()
    start = target.parent if is_file else target
    if is_file and target.name == ROOT_MARKER and _is_run_root(start):
        return f"{target} is the summary of the run root {start}"
    for folder in (start, *start.parents):
        kind = _finished_kind(folder)
        if kind is not None and not (folder == start and kind == own):
            return f"{folder} is {_WHAT[kind]}"
    return None


def confine_output(
    path: str | os.PathLike, flag: str = "--out", *, is_file: bool = False, own: str | None = None
) -> Path:
    """``path`` unchanged, or one error line when it resolves (symlinks followed) into a bundle or a finished run:
    nothing is written there. See ``finished_folder``."""
    why = finished_folder(path, is_file=is_file, own=own)
    if why is not None:
        raise OutputPathError(
            f"{flag} {path} lies inside a finished folder: {why}, and a command never writes into one (it would "
            f"replace its files); choose an {flag} outside it"
        )
    return Path(path)
