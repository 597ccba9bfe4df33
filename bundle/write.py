"""Write a bundle from a trained run root: only a whole, fresh chain of stages (the vote fitted on the classifiers it
packs, those trained on crops of the U-Net it packs), checksummed, with its model card."""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tarfile
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from dermpipe.bundle.describe import (
    META,
    UNET,
    _described,
    _read_json,
    _read_metrics,
    _with_digests,
    classifier_weights,
)
from dermpipe.bundle.store import (
    CARD_FILE,
    CHECKSUMS,
    FORMAT,
    FORMAT_VERSION,
    INFO_FILE,
    Bundle,
    BundleError,
    open_bundle,
)
from dermpipe.configs.schema import ROOT_LAYOUT
from dermpipe.data.manifest import Manifest, ManifestError
from dermpipe.engine.checkpoint import CheckpointError, read_metadata
from dermpipe.engine.files import atomic_path, file_digest, remove_stale_temporaries
from dermpipe.engine.lineage import read_lineage, short, stale_stages
from dermpipe.version import __version__

logger = logging.getLogger(__name__)


# files copied from each stage's run folder when present (the weights are required)
STAGE_FILES = {
    "segmentation": ("best.safetensors", "config.yaml", "metrics.csv"),
    "classification": ("best.safetensors", "config.yaml", "metrics.csv", "metrics_test.json", "ood.safetensors"),
    "ensemble": ("meta.safetensors", "config.yaml", "summary.json", "methods.csv"),
}


LIBRARIES = ("torch", "torchvision", "timm", "segmentation-models-pytorch", "numpy", "opencv-python-headless",
             "safetensors", "scikit-learn", "albumentations")  # fmt: skip


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "dermpipe": __version__}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def _stage_sources(root: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """Every file to copy (bundle path -> source) and the vote's metadata; a missing stage names its command."""
    seg = root / ROOT_LAYOUT["segmentation"]
    ens = root / ROOT_LAYOUT["ensemble"]
    cls_root = root / ROOT_LAYOUT["classification"]
    needed = [
        (seg / "best.safetensors", f"python segmentation/train.py --manifest FILE --root {root}"),
        (ens / "meta.safetensors", f"python ensemble/vote.py --root {root}"),
    ]
    for path, command in needed:
        if not path.is_file():
            raise BundleError(f"{path} not found: a bundle needs every trained stage; make it with `{command}`")
    try:
        vote = read_metadata(ens / "meta.safetensors")
    except CheckpointError as e:
        raise BundleError(str(e)) from None
    folders = {"segmentation": seg, "ensemble": ens}
    for backbone in vote["backbones"]:
        folder = cls_root / backbone
        if not (folder / "best.safetensors").is_file():
            raise BundleError(
                f"{folder / 'best.safetensors'} not found: the vote stacks {backbone}; train it with "
                f"`python classification/train.py --backbone {backbone} --root {root}`"
            )
        folders[f"classification/{backbone}"] = folder
    files: dict[str, Path] = {}
    for where, folder in folders.items():
        for name in STAGE_FILES[where.split("/")[0]]:
            if (folder / name).is_file():
                files[f"{where}/{name}"] = folder / name
    return files, vote


def _class_counts(manifest_path: str | None) -> dict[str, dict[str, int]] | None:
    """Images per split and class in the manifest the classifiers were trained from (None when it is gone)."""
    if not manifest_path or not Path(manifest_path).is_file():
        return None
    try:
        manifest = Manifest.read(manifest_path)
    except ManifestError:
        return None
    counts: dict[str, dict[str, int]] = {}
    for row in manifest.rows:
        split = row.get("split") or "unsplit"
        label = row.get("label") or "(unlabelled)"
        counts.setdefault(split, {}).setdefault(label, 0)
        counts[split][label] += 1
    return counts


def _bundle_info(name: str, root: Path, files: Mapping[str, Path], digests: Mapping[str, str]) -> dict[str, Any]:
    manifest_path = _training_manifest(files)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_root": root.name,
        **_with_digests(_described(files), digests),
        "training_data": {
            "manifest": Path(manifest_path).name if manifest_path else None,
            "images": _class_counts(manifest_path),
        },  # fmt: skip
        "versions": _versions(),
    }


def _training_manifest(files: Mapping[str, Path]) -> str | None:
    """The manifest the classifiers were trained from, as their config.yaml names it (None when none does)."""
    for rel in sorted(files):
        if rel.startswith(f"{ROOT_LAYOUT['classification']}/") and rel.endswith("/config.yaml"):
            manifest = (yaml.safe_load(files[rel].read_text()) or {}).get("data", {}).get("manifest")
            if manifest:
                return str(manifest)
    return None


def _stale(root: Path, backbones: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The lines naming each stage the bundle would pack that is stale by its lineage (``stale_stages``) or kept no
    lineage; and the weights digests the lineage records (bundle path -> sha256: what each stage's metrics scored;
    ``model:<backbone>``: the classifiers the vote was fitted on), empty where a record is missing."""
    cls = ROOT_LAYOUT["classification"]
    folders = {UNET: ROOT_LAYOUT["segmentation"], META: ROOT_LAYOUT["ensemble"],
               **{classifier_weights(b): f"{cls}/{b}" for b in backbones}}  # fmt: skip
    packed = {*folders.values(), ROOT_LAYOUT["crops"]}
    # without the manifest: the classifiers' config names the crops manifest, not the one the U-Net was trained on
    lines = [
        line
        for line in stale_stages(root)
        if any(line.startswith((f"{p} ", f"{p}/")) for p in packed)
    ]  # fmt: skip
    records = {rel: read_lineage(root / folder) or {} for rel, folder in folders.items()}
    for rel, record in records.items():
        if not record and not any(line.startswith(f"{folders[rel]} ") for line in lines):
            lines.append(f"{folders[rel]} has no readable lineage record: rerun `dermpipe run --force` or retrain it")
    produced = {UNET: "weights", META: "meta", **{classifier_weights(b): "weights" for b in backbones}}
    digests = {rel: str((records[rel].get("produced") or {}).get(key) or "") for rel, key in produced.items()}
    vote = records[META].get("consumed") or {}
    digests.update({f"model:{b}": str(vote.get(f"model:{b}") or "") for b in backbones})
    return lines, digests


def _weights_digests(files: Mapping[str, Path], backbones: Sequence[str]) -> dict[str, str]:
    """The sha256 of each weights file the bundle packs (bundle path -> sha256)."""
    return {rel: file_digest(files[rel]) for rel in (UNET, META, *map(classifier_weights, backbones))}


def _mismatches(
    root: Path, files: Mapping[str, Path], digest: Mapping[str, str], lineage: Mapping[str, str] | None
) -> list[str]:
    """The lines naming each packed stage whose weights are not those the others were made with: the vote fitted on
    other classifier weights, classifiers trained on crops of another U-Net (both from the weights' own records),
    and, given the ``lineage`` digests, weights other than those a stage's lineage (so its metrics) names."""
    vote = read_metadata(files[META])
    backbones = list(vote["backbones"])
    recorded = vote.get("weights_digests") if isinstance(vote.get("weights_digests"), dict) else {}
    lines = []
    for rel in (UNET, *map(classifier_weights, backbones), META) if lineage is not None else ():
        if lineage[rel] != digest[rel]:
            lines.append(f"{Path(rel).parent.as_posix()}: its lineage (and metrics) are of weights "
                         f"{short(lineage[rel])} but {rel} is {short(digest[rel])}: retrain it")  # fmt: skip
    for b in backbones:
        have = digest[classifier_weights(b)]
        fitted = {
            *([lineage[f"model:{b}"]] if lineage is not None else []),
            *([recorded[b]] if recorded.get(b) else []),
        }
        if fitted - {have}:
            lines.append(f"{ROOT_LAYOUT['ensemble']}: the vote was fitted on {b} "
                         f"{' / '.join(short(d) for d in sorted(fitted))} but the bundle would pack {b} {short(have)}: "
                         f"fit the vote again (`python ensemble/vote.py --root {root}`)")  # fmt: skip
        crops = read_metadata(files[classifier_weights(b)]).get("crops")
        unet = crops.get("segmentation_weights") if isinstance(crops, dict) else None
        if unet and unet != digest[UNET]:
            lines.append(f"{ROOT_LAYOUT['classification']}/{b} was trained on crops of U-Net {short(unet)} but the "
                         f"bundle would pack U-Net {short(digest[UNET])}: make the crops again and retrain it "
                         f"(`dermpipe run --root {root}`)")  # fmt: skip
    return lines


def _check_chain(root: Path, files: Mapping[str, Path], backbones: Sequence[str]) -> dict[str, str]:
    """Refuse a root whose packed stages do not belong together (stale by their lineage, without lineage, or of
    other weights than those the others were made with), naming each; return the packed weights' digests, which the
    lineage, and so each stage's metrics, names."""
    stale, lineage = _stale(root, backbones)
    digest = _weights_digests(files, backbones)
    lines = [*stale, *_mismatches(root, files, digest, None if stale else lineage)]
    if lines:
        raise BundleError(f"{root} cannot be bundled: {'; '.join(lines)}")
    return digest


def _checksums(folder: Path) -> str:
    lines = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS):
        lines.append(f"{file_digest(path)}  {path.relative_to(folder).as_posix()}\n")
    return "".join(lines)


def write_bundle(root: str | os.PathLike, out: str | os.PathLike, archive: bool = False) -> Bundle:
    """Copy the trained stages of ``root`` into a new bundle folder ``out`` (and ``out.tar.gz`` with ``archive``).

    The folder is assembled beside ``out`` and renamed into place when whole; an existing ``out`` is refused.
    """
    from dermpipe.bundle.card import card_warnings, model_card

    root, out = Path(root), Path(out)
    if out.exists() or out.is_symlink():
        raise BundleError(f"{out} already exists: pass another --out (a bundle is never overwritten)")
    files, vote = _stage_sources(root)
    backbones = list(vote["backbones"])
    digests = _check_chain(root, files, backbones)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out.parent, recursive=False)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        for rel, src in files.items():
            (partial / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, partial / rel)
        packed = {rel: partial / rel for rel in files}
        if _weights_digests(packed, backbones) != digests:  # what was copied is what was checked
            raise BundleError(f"{root} changed while it was bundled (a stage was retrained?): bundle it again")
        info = _bundle_info(out.name, root, packed, digests)
        for warning in card_warnings(info, _read_json(partial / "ensemble" / "summary.json")):
            logger.warning("bundle %s: %s", out.name, warning)
        (partial / INFO_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
        summary = _read_json(partial / "ensemble" / "summary.json")
        (partial / CARD_FILE).write_text(model_card(info, summary, _read_metrics(partial / "segmentation")))
        (partial / CHECKSUMS).write_text(_checksums(partial))
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    bundle = open_bundle(out)
    if archive:
        with atomic_path(out.parent / f"{out.name}.tar.gz") as tmp, tarfile.open(tmp, "w:gz") as tar:
            tar.add(out, arcname=out.name)
    return bundle
