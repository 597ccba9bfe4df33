"""Before ``dermpipe run`` trains anything: every stage folder under the root that holds a run this run would replace.

A stage folder is in the way when it holds a run made with other settings or data (each differing key named), when
what it was made from is about to be remade (a U-Net trained anew remakes the crops, a classifier trained anew
changes the tables the vote learned from), or when its lineage says its inputs changed since it finished (stale).
All of them are named at once, so one look tells what ``--force`` would replace.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dermpipe.classification.config import ClassificationConfig
from dermpipe.classification.conflicts import classification_conflicts
from dermpipe.classification.folds import stale_folds, training_fingerprint
from dermpipe.configs.loader import default_config_path, load_config
from dermpipe.configs.schema import ROOT_LAYOUT
from dermpipe.data.manifest import Manifest, ManifestError
from dermpipe.engine.checkpoint import CheckpointError, resume_summary
from dermpipe.engine.claim import finished_state
from dermpipe.engine.lineage import stale_entries
from dermpipe.engine.loop import STATE_FILE
from dermpipe.engine.rerun import Conflict
from dermpipe.ensemble.config import EnsembleConfig
from dermpipe.ensemble.stacked_tables import TableError, load_probability_tables
from dermpipe.ensemble.voting import vote_conflict, vote_key, vote_settings
from dermpipe.segmentation.config import SegmentationConfig
from dermpipe.segmentation.prediction import CROP_SETTINGS
from dermpipe.segmentation.training import training_conflicts
from dermpipe.segmentation.training import training_fingerprint as unet_fingerprint

# the key of one backbone's classification settings in the per-stage ``--set`` lists of ``dermpipe run``
CLASSIFICATION_OF = "classification/"


def classifier_sets(sets: Mapping[str, Sequence[str]], backbone: str) -> list[str]:
    """The classification ``--set`` items of ``backbone``: its own (an experiment file's ``backbone_settings``, which
    include the common section and the command line's) when it has some, else the common ones."""
    return list(sets.get(f"{CLASSIFICATION_OF}{backbone}", sets["classification"]))


def stage_configs(
    root: Path,
    manifest: str,
    backbones: Sequence[str],
    sets: Mapping[str, Sequence[str]],
    folds: int,
    run: Mapping[str, Any] | None = None,
) -> tuple[SegmentationConfig, list[ClassificationConfig], EnsembleConfig]:
    """The config of each stage ``dermpipe run`` calls: defaults < the experiment's settings < its own flags (the run
    root, the manifest, the backbones, the folds, and ``run``: the device and ``--force`` where given)."""
    common = {"run.root": str(root), **(run or {})}
    seg = load_config(SegmentationConfig, default_config_path("segmentation"), sets["segmentation"],
                      {**common, "data.manifest": str(manifest)})  # fmt: skip
    cls = [
        load_config(
            ClassificationConfig,
            default_config_path("classification"),
            classifier_sets(sets, backbone),
            {**common, "model.backbone": backbone, "train.folds": folds or None},
        )
        for backbone in backbones
    ]
    vote_flags = {**common, "data.backbones": ",".join(backbones), "data.fit_split": "oof" if folds else None}
    ens = load_config(EnsembleConfig, default_config_path("ensemble"), sets["ensemble"], vote_flags)
    return seg, cls, ens


def _state(folder: Path) -> dict[str, Any] | None:
    try:
        return resume_summary(folder / STATE_FILE)
    except CheckpointError:
        return None


def _crops_remade(seg: SegmentationConfig, sets: Sequence[str], unet_trains: bool, stale: Sequence[str]) -> str:
    """Why the crops will be remade unlike the ones the classifiers trained on ("": they will be the same)."""
    if unet_trains:
        return "trained on crops of a U-Net that this run trains anew"
    if "crops" in stale:
        return "trained on crops of an earlier U-Net, which this run remakes"
    try:
        made = Manifest.read(Path(seg.run.root) / ROOT_LAYOUT["crops"] / "crops.csv").info.get("crops") or {}
    except (ManifestError, OSError):
        return "trained on crops that are missing or unreadable, which this run remakes"
    # segmentation/predict.py crops with the U-Net run's own config.yaml and the --set items, as here
    trained = Path(seg.run.out_dir) / "config.yaml"
    if trained.is_file():
        seg = load_config(SegmentationConfig, trained, sets, {"run.root": seg.run.root})
    now = json.loads(json.dumps({k: getattr(seg.predict, k) for k in CROP_SETTINGS}))
    changed = [
        f"segmentation.predict.{k} {made[k]} -> {now[k]}" for k in CROP_SETTINGS if k in made and made[k] != now[k]
    ]
    return f"trained on crops of other settings ({', '.join(changed)}), which this run remakes" if changed else ""


def _classifier_trains(cfg: ClassificationConfig) -> bool:
    """This backbone has no finished run with ``cfg``'s settings: the stage will train it."""
    backbone_dir = Path(cfg.run.out_dir) / cfg.model.backbone
    if not (backbone_dir / "best.safetensors").is_file():
        return True
    if not cfg.train.folds:
        return finished_state(backbone_dir, training_fingerprint(cfg, cfg.data.manifest, None), warn=False) is None
    return bool(stale_folds(cfg, backbone_dir, cfg.train.folds))


def planned_conflicts(
    root: Path, manifest: str, backbones: Sequence[str], sets: Mapping[str, Sequence[str]], folds: int
) -> list[Conflict | str]:
    """Every stage folder under ``root`` that this ``dermpipe run`` would replace, each once: a ``Conflict`` naming
    its differing keys or why, or a line of ``stale_stages``."""
    seg, classifiers, vote = stage_configs(root, manifest, backbones, sets, folds)
    found: list[Conflict | str] = []
    stale = {name: text for name, text, _ in stale_entries(root, manifest, missing=False)}
    found += training_conflicts(seg, Path(seg.run.out_dir))
    unet_trains = finished_state(Path(seg.run.out_dir), unet_fingerprint(seg), warn=False) is None
    remade = _crops_remade(seg, sets["segmentation"], unet_trains, list(stale))
    retrained = []
    for cfg in classifiers:
        backbone_dir = Path(cfg.run.out_dir) / cfg.model.backbone
        if remade:
            states = [s for s in map(_state, [backbone_dir, *backbone_dir.glob("fold*")]) if s is not None]
            if states:
                finished = any(s.get("finished") for s in states)
                found.append(Conflict(backbone_dir, f"{cfg.model.backbone} classifier", finished, None, remade))
            retrained.append(cfg.model.backbone)
            continue
        conflicts = classification_conflicts(cfg)
        found += conflicts
        if conflicts or _classifier_trains(cfg):
            retrained.append(cfg.model.backbone)
    out = Path(vote.run.out_dir)
    if retrained and (out / "summary.json").is_file():
        reason = f"fitted on the tables of {', '.join(retrained)}, which this run trains anew"
        found.append(Conflict(out, "vote", True, None, reason))
    elif not retrained:
        try:
            d = vote.data
            fit = load_probability_tables(d.classification_root, d.backbones, d.fit_split)
            test = load_probability_tables(d.classification_root, d.backbones, d.test_split)
            conflict = vote_conflict(out, vote_key(vote, fit, test), vote_settings(vote, fit, test))
            found += [conflict] if conflict is not None else []
        except TableError:
            pass  # the vote stage names what is missing when it runs
    named = {c.folder.resolve() for c in found if isinstance(c, Conflict)}
    found += [text for name, text in stale.items() if name != "crops" and (root / name).resolve() not in named]
    return found
