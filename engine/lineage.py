"""Lineage: each stage's ``lineage.json`` records the sha256 of what it consumed and of what it produced.

Stages and the names they record (``consumed`` -> ``produced``):

- ``segmentation``: ``manifest`` -> ``weights`` (``best.safetensors``)
- ``crops``: ``manifest``, ``unet`` (the U-Net's ``best.safetensors``) -> ``crops_manifest`` (``crops.csv``)
- ``classification`` (one per backbone folder): ``crops_manifest`` (or ``manifest`` alone when trained on whole
  images), ``manifest`` -> ``weights``
- ``vote``: ``tables:<backbone>:<split>`` (each probability table) and ``model:<backbone>`` (that backbone's
  weights) -> ``meta`` (``meta.safetensors``)

A stage is stale when a digest it consumed no longer matches what the run root holds now (``stale_stages``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from dermpipe.configs.schema import ROOT_LAYOUT
from dermpipe.engine.files import FileInputError, file_digest, write_text_atomic

LINEAGE_FILE = "lineage.json"
STAGES = ("segmentation", "crops", "classification", "vote")
# The file a finished stage leaves, relative to its folder; a finished stage without lineage is reported.
FINISHED_FILE = {
    "segmentation": "best.safetensors",
    "crops": "crops.csv",
    "classification": "best.safetensors",
    "vote": "meta.safetensors",
}
# Files whose digest a stage records as produced, relative to its folder.
PRODUCED_FILE = {"weights": "best.safetensors", "crops_manifest": "crops.csv", "meta": "meta.safetensors"}


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file's bytes (the project's one file digest)."""
    return file_digest(path)


def short(digest: str | None) -> str:
    """A digest as its first 8 hex digits (``3fa2c0de..``), for messages and compact columns."""
    return f"{digest[:8]}.." if digest else "none"


def write_lineage(folder: Path, stage: str, consumed: Mapping[str, str], produced: Mapping[str, str]) -> None:
    """Write ``folder/lineage.json`` atomically: the stage, and the digests of what it consumed and produced."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: one of {', '.join(STAGES)}")
    record = {"stage": stage, "consumed": dict(sorted(consumed.items())), "produced": dict(sorted(produced.items()))}
    path, text = Path(folder) / LINEAGE_FILE, json.dumps(record, indent=2) + "\n"
    if not path.is_file() or path.read_text() != text:  # a stage reused as it was leaves its record untouched
        write_text_atomic(path, text)


def read_lineage(folder: Path) -> dict[str, Any] | None:
    """``folder/lineage.json`` as written by ``write_lineage``; ``None`` when missing or unreadable."""
    try:
        record = json.loads((Path(folder) / LINEAGE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("consumed"), dict):
        return None
    record.setdefault("produced", {})
    return record


def stage_folders(root: Path) -> list[tuple[str, Path]]:
    """``(stage, folder)`` of every stage folder under a run root that holds a finished stage, upstream first."""
    root = Path(root)
    found = [
        ("segmentation", root / ROOT_LAYOUT["segmentation"]),
        ("crops", root / ROOT_LAYOUT["crops"]),
        *(("classification", p) for p in sorted((root / ROOT_LAYOUT["classification"]).glob("*")) if p.is_dir()),
        ("vote", root / ROOT_LAYOUT["ensemble"]),
    ]
    return [(stage, folder) for stage, folder in found if (folder / FINISHED_FILE[stage]).is_file()]


def training_manifest(root: Path) -> str | None:
    """The manifest the run root's U-Net was trained on, as its saved ``config.yaml`` names it (``None``: none)."""
    try:
        config = yaml.safe_load((Path(root) / ROOT_LAYOUT["segmentation"] / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    manifest = config.get("data", {}).get("manifest") if isinstance(config, dict) else None
    return str(manifest) if manifest else None


class CurrentDigests:
    """The digests a run root holds now, by lineage name, each file hashed once (``None``: the file is gone)."""

    def __init__(self, root: Path, manifest: str | os.PathLike | None = None) -> None:
        self.root, self.manifest = Path(root), manifest or training_manifest(root)
        self.seen: dict[Path, str | None] = {}

    def path(self, name: str) -> Path | None:
        """The file that lineage name ``name`` stands for in this root (``None``: not one this root can tell)."""
        kind, _, rest = name.partition(":")
        classifiers = self.root / ROOT_LAYOUT["classification"]
        if kind == "manifest":
            return Path(self.manifest) if self.manifest else None
        if kind == "unet":
            return self.root / ROOT_LAYOUT["segmentation"] / "best.safetensors"
        if kind == "crops_manifest":
            return self.root / ROOT_LAYOUT["crops"] / "crops.csv"
        if kind == "model" and rest:
            return classifiers / rest / "best.safetensors"
        if kind == "tables" and rest.count(":") == 1:
            backbone, split = rest.split(":")
            return classifiers / backbone / f"probs_{split}.csv"
        return None

    def digest(self, path: Path) -> str | None:
        if path not in self.seen:
            try:
                self.seen[path] = file_digest(path)
            except FileInputError:
                self.seen[path] = None
        return self.seen[path]


_WHAT = {"manifest": "the manifest", "unet": "the U-Net", "crops_manifest": "the crops"}


def _what(name: str) -> str:
    kind, _, rest = name.partition(":")
    if kind == "model":
        return f"the {rest} classifier"
    if kind == "tables":
        backbone, _, split = rest.partition(":")
        return f"the {backbone} {split} table"
    return _WHAT.get(kind, name)


def stale_stages(root: Path, manifest: str | os.PathLike | None = None, missing: bool = True) -> list[str]:
    """One line per finished stage of run root ``root`` whose consumed digests no longer match the files the root
    holds now, or whose produced files changed since its lineage was written, or that has no lineage at all.

    ``manifest``: the manifest of images and labels the run uses now (not the crops manifest; its digest is compared
    with the one each stage recorded); default: the one the U-Net's saved ``config.yaml`` names, if any.
    ``missing=False`` leaves out the stages that kept no lineage (a rerun that reuses them records it).
    """
    return [f"{text}: {fix}" for _, text, fix in stale_entries(root, manifest, missing)]


def stale_entries(
    root: Path, manifest: str | os.PathLike | None = None, missing: bool = True
) -> list[tuple[str, str, str]]:
    """``stale_stages`` as ``(stage folder relative to the root, what is stale, the fix)``."""
    root = Path(root)
    now = CurrentDigests(root, manifest)
    rerun, force = "rerun `dermpipe run` or retrain it", "rerun `dermpipe run --force` or retrain it"
    out = []
    for _stage, folder in stage_folders(root):
        name = folder.relative_to(root).as_posix()
        record = read_lineage(folder)
        if record is None:
            if missing:
                out.append((name, f"{name} has no lineage record (made before lineage was kept): its inputs cannot "
                            "be checked", force))  # fmt: skip
            continue
        for key, old in record["consumed"].items():
            path = now.path(key)
            if path is None:
                continue
            new = now.digest(path)
            if new is None and key == "manifest":
                continue  # the manifest lies outside the root (a relative path, moved): it cannot be checked here
            if new != old:
                what = _what(key)
                state = f"{what} {'are' if what.endswith('s') else 'is'} now {short(new)}" if new else f"{path} is gone"
                out.append((name, f"{name} was made from {what} {short(old)} but {state}", rerun))
        for key, old in record["produced"].items():
            file = PRODUCED_FILE.get(key)
            if file is None or not (folder / file).is_file():
                continue
            new = now.digest(folder / file)
            if new != old:
                out.append((name, f"{name}/{file} is {short(new)}, not the {short(old)} its lineage records "
                            "(replaced by hand?)", force))  # fmt: skip
    return out


def record_hand_made(root: Path, backbones: Sequence[str]) -> Path:
    """Each stage's ``lineage.json`` for stage folders written by hand under ``root`` (``segmentation``,
    ``classification/<backbone>``, ``ensemble``: untrained models for benchmarks and tests), as the stages record it
    when they finish: the U-Net's and each classifier's weights, and the vote's models and its own weights."""
    root = Path(root)
    seg, cls, ens = root / "segmentation", root / "classification", root / "ensemble"
    write_lineage(seg, "segmentation", {}, {"weights": file_sha256(seg / "best.safetensors")})
    models = {f"model:{b}": file_sha256(cls / b / "best.safetensors") for b in backbones}
    for b in backbones:
        write_lineage(cls / b, "classification", {}, {"weights": models[f"model:{b}"]})
    write_lineage(ens, "vote", models, {"meta": file_sha256(ens / "meta.safetensors")})
    return root
