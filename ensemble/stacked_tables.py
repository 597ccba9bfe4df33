"""Stack the classifiers' probability tables (images x backbones x classes), refusing mismatched or leaking tables."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dermpipe.classification.backbones import DEFAULT_BACKBONES
from dermpipe.engine import csvsafe
from dermpipe.errors import DermpipeError, plain_message

logger = logging.getLogger(__name__)

ID_COLUMNS: tuple[str, ...] = ("image_id", "crop_key", "label")


class TableError(DermpipeError):
    """A probability table that is missing, unreadable, or disagrees with the others."""


class LeakError(TableError):
    """A table whose probabilities come from a model that trained on the images the vote would learn from."""


@dataclass(frozen=True)
class StackedTable:
    """One split's probabilities from every backbone, aligned on the image ids of the first backbone's table."""

    split: str
    ids: tuple[str, ...]
    crop_keys: tuple[str, ...]
    labels: np.ndarray  # (N,) int64 class indices, -1 = unlabelled
    classes: tuple[str, ...]
    probs: np.ndarray  # (N, B, C) float64
    backbones: tuple[str, ...]
    sources: tuple[dict[str, Any], ...]  # each backbone's JSON sidecar, in backbone order

    def __len__(self) -> int:
        return len(self.ids)

    def labelled(self) -> StackedTable:
        """The rows with a label (the only ones a vote can learn from or be scored on)."""
        keep = self.labels >= 0
        return StackedTable(
            split=self.split,
            ids=tuple(i for i, k in zip(self.ids, keep) if k),
            crop_keys=tuple(c for c, k in zip(self.crop_keys, keep) if k),
            labels=self.labels[keep],
            classes=self.classes,
            probs=self.probs[keep],
            backbones=self.backbones,
            sources=self.sources,
        )


@dataclass(frozen=True)
class _BackboneTable:
    ids: list[str]
    crop_keys: list[str]
    labels: list[str]
    probs: np.ndarray
    sidecar: dict[str, Any]


def table_paths(root: str | os.PathLike, backbone: str, split: str) -> tuple[Path, Path]:
    """``<root>/<backbone>/probs_<split>.csv`` and its JSON sidecar."""
    folder = Path(root) / backbone
    return folder / f"probs_{split}.csv", folder / f"probs_{split}.json"


def trained_backbones(root: str | os.PathLike, split: str) -> list[str]:
    """The backbones with a ``<split>`` table under ``root``: the default five first, in their order, then the others
    by name."""
    folder = Path(root)
    found = sorted(d.name for d in folder.iterdir() if d.is_dir() and all(p.is_file() for p in table_paths(
        folder, d.name, split))) if folder.is_dir() else []  # fmt: skip
    return [b for b in DEFAULT_BACKBONES if b in found] + [b for b in found if b not in DEFAULT_BACKBONES]


def _make_command(backbone: str, split: str) -> str:
    folds = " --folds K" if split == "oof" else ""
    return f"python classification/train.py --backbone {backbone}{folds}"


def _trained_on_tokens(trained_on: Any) -> set[str]:
    if isinstance(trained_on, list | tuple):
        trained_on = " ".join(map(str, trained_on))
    # a parenthesis comments on the training data ("(fold 0 held out)"), it does not add to it
    described = re.sub(r"\([^)]*\)", " ", str(trained_on or "").lower())
    return {t for t in re.split(r"[^a-z0-9_]+", described) if t}


def check_no_leak(sidecar: dict[str, Any], backbone: str, split: str, path: Path) -> None:
    """Refuse a table computed on training images, or by a model whose training data included ``split``.

    ``trained_on`` is a free description ("train", "train+val", "train folds 1,2,3,4 (fold 0 held out)"); the split
    name appearing in it as a word, outside parentheses, means the model saw these images.
    """
    source = str(sidecar.get("source", ""))
    if source == "train":
        raise LeakError(
            f"{path} holds probabilities on the training images of {backbone} (source=train): the vote may only learn "
            f"from images the backbone did not train on; use --fit-split val or oof"
        )
    if split in _trained_on_tokens(sidecar.get("trained_on")):
        raise LeakError(
            f"{path}: backbone {backbone} was trained on {sidecar.get('trained_on')!r}, which includes the {split} "
            f"images it scored, so stacking on them would leak; retrain it without {split} "
            f"({_make_command(backbone, split)}) or choose another split"
        )


def _read_sidecar(path: Path, backbone: str, split: str) -> dict[str, Any]:
    try:
        sidecar = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TableError(
            f"sidecar {path} of backbone {backbone} cannot be read ({plain_message(e)}); "
            f"rerun {_make_command(backbone, split)}"
        ) from None
    if not isinstance(sidecar, dict) or not isinstance(sidecar.get("classes"), list) or not sidecar["classes"]:
        raise TableError(f"sidecar {path} lacks the list of classes; rerun {_make_command(backbone, split)}")
    return sidecar


def read_backbone_table(root: str | os.PathLike, backbone: str, split: str) -> _BackboneTable:
    """One backbone's table for one split, checked against its sidecar (columns, split, leak guard)."""
    csv_path, json_path = table_paths(root, backbone, split)
    if not csv_path.parent.is_dir():
        raise TableError(
            f"backbone {backbone} is missing: no folder {csv_path.parent}; run {_make_command(backbone, split)} "
            f"or drop it with --backbones"
        )
    for path in (csv_path, json_path):
        if not path.is_file():
            raise TableError(
                f"backbone {backbone} has no {split} probability table ({path} not found); run "
                f"{_make_command(backbone, split)}"
            )
    sidecar = _read_sidecar(json_path, backbone, split)
    if sidecar.get("split", split) != split:
        raise TableError(
            f"sidecar {json_path} says split={sidecar.get('split')!r}, not {split!r}: the file is misnamed"
        )
    if sidecar.get("backbone", backbone) != backbone:
        raise TableError(
            f"sidecar {json_path} says backbone={sidecar.get('backbone')!r}, not {backbone!r}: the folder is misnamed"
        )
    check_no_leak(sidecar, backbone, split, csv_path)
    classes = [str(c) for c in sidecar["classes"]]
    try:
        with csv_path.open(newline="") as f:
            reader = csvsafe.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        why = plain_message(e)
        raise TableError(f"{csv_path} cannot be read ({why}); rerun {_make_command(backbone, split)}") from None
    if header != [*ID_COLUMNS, *classes]:
        raise TableError(
            f"{csv_path} has columns {header}, expected {[*ID_COLUMNS, *classes]} (the classes of its sidecar); "
            f"rerun {_make_command(backbone, split)}"
        )
    try:
        probs = np.array([[float(r[c]) for c in classes] for r in rows], dtype=np.float64).reshape(-1, len(classes))
    except (TypeError, ValueError):
        raise TableError(f"{csv_path} holds a probability that is not a number") from None
    if not np.isfinite(probs).all() or (probs < 0).any():
        raise TableError(f"{csv_path} holds a probability that is negative or not finite")
    ids = [r["image_id"] for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise TableError(f"{csv_path} lists image {dup} more than once")
    return _BackboneTable(ids, [r["crop_key"] for r in rows], [r["label"] for r in rows], probs, sidecar)


def _label_indices(labels: Sequence[str], classes: Sequence[str], path: Path) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    out = np.full(len(labels), -1, dtype=np.int64)
    for row, label in enumerate(labels):
        if label:
            if label not in index:
                raise TableError(f"{path}: label {label!r} is not one of the classes {list(classes)}")
            out[row] = index[label]
    return out


def load_probability_tables(root: str | os.PathLike, backbones: Sequence[str], split: str) -> StackedTable:
    """Stack ``<root>/<backbone>/probs_<split>.csv`` for every backbone into an (images, backbones, classes) array.

    Refuses a missing backbone (naming it and the command that makes its table), classes that differ, image sets or
    crop keys that differ (naming the first differing image), labels that differ, and leaking tables (``LeakError``).
    """
    if not backbones:
        raise TableError("no backbones given: set data.backbones or pass --backbones a,b,c")
    if len(set(backbones)) != len(backbones):
        raise TableError(f"backbones {list(backbones)} name one backbone twice")
    tables = [read_backbone_table(root, b, split) for b in backbones]
    first, name0 = tables[0], backbones[0]
    classes = tuple(str(c) for c in first.sidecar["classes"])
    position = {image_id: row for row, image_id in enumerate(first.ids)}
    probs = np.empty((len(first.ids), len(backbones), len(classes)), dtype=np.float64)
    for b, (name, table) in enumerate(zip(backbones, tables)):
        other = tuple(str(c) for c in table.sidecar["classes"])
        if other != classes:
            raise TableError(
                f"{split} tables disagree on classes: {name0} has {list(classes)}, {name} has {list(other)}; "
                f"retrain them on one manifest"
            )
        table_ids = set(table.ids)
        missing = next((i for i in first.ids if i not in table_ids), None)
        extra = next((i for i in table.ids if i not in position), None)
        if missing is not None or extra is not None:
            image, has, lacks = (missing, name0, name) if missing is not None else (extra, name, name0)
            raise TableError(
                f"{split} tables disagree on images: image {image} is in {has}'s table but not in {lacks}'s; "
                f"rerun the classifiers on one crops manifest"
            )
        order = np.array([position[i] for i in table.ids], dtype=np.int64)
        for row, image_id in enumerate(table.ids):
            key0 = first.crop_keys[position[image_id]]
            if table.crop_keys[row] != key0:
                raise TableError(
                    f"{split} tables disagree on the crop of image {image_id}: {name0} scored crop {key0[:12]!r}, "
                    f"{name} scored {table.crop_keys[row][:12]!r}; rerun the classifiers on the current crops"
                )
            if table.labels[row] != first.labels[position[image_id]]:
                raise TableError(
                    f"{split} tables disagree on the label of image {image_id}: {name0} says "
                    f"{first.labels[position[image_id]]!r}, {name} says {table.labels[row]!r}"
                )
        probs[order, b, :] = table.probs
    path0 = table_paths(root, name0, split)[0]
    table = StackedTable(
        split=split,
        ids=tuple(first.ids),
        crop_keys=tuple(first.crop_keys),
        labels=_label_indices(first.labels, classes, path0),
        classes=classes,
        probs=probs,
        backbones=tuple(backbones),
        sources=tuple(t.sidecar for t in tables),
    )
    logger.info("%s tables: %d images x %d backbones x %d classes", split, *probs.shape)
    return table


def check_fit_and_test_agree(fit: StackedTable, test: StackedTable) -> None:
    """The fit and test stacks must share backbones and classes, share no image, and (for a held-out validation
    split) come from the same weights, or the vote would be scored on another model than the one it learned from.
    """
    if fit.backbones != test.backbones:
        raise TableError(
            f"{fit.split} and {test.split} tables stack different backbones: "
            f"{list(fit.backbones)} vs {list(test.backbones)}"
        )
    if fit.classes != test.classes:
        raise TableError(
            f"{fit.split} and {test.split} tables disagree on classes: {list(fit.classes)} vs {list(test.classes)}"
        )
    shared = sorted(set(fit.ids) & set(test.ids))
    if shared:
        raise LeakError(
            f"image {shared[0]} (and {len(shared) - 1} more) is in both the {fit.split} and the {test.split} tables: "
            f"the test images must be unseen by the vote; rebuild the splits"
        )
    if fit.split == "val":
        for name, a, b in zip(fit.backbones, fit.sources, test.sources):
            da, db = a.get("weights_digest"), b.get("weights_digest")
            if da and db and da != db:
                raise TableError(
                    f"backbone {name}'s {fit.split} and {test.split} tables come from different weights "
                    f"({str(da)[:12]} vs {str(db)[:12]}): rerun python classification/train.py --backbone {name}"
                )
