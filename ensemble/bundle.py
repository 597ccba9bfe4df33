"""A portable model bundle: every trained stage of one run root in one folder a colleague can run from alone.

Layout (the run root's own, so the predictor reads a bundle as it reads a root)::

    NAME/
      bundle.json            classes, backbones, preprocessing and crop settings, calibration, library versions
      MODEL_CARD.md          the data, the splits, the measured metrics with intervals, intended use and limits
      SHA256SUMS             "<sha256>  <path>" for every other file (sha256sum -c reads it)
      segmentation/          best.safetensors (the U-Net), config.yaml, metrics.csv
      classification/<b>/    best.safetensors (backbone + SE + head; or K fold models, their mean), config.yaml,
                             metrics.csv, metrics_test.json
      ensemble/              meta.safetensors (vote, temperature, refer threshold), config.yaml, summary.json,
                             methods.csv

Only weights (safetensors, no pickle) and text: no optimiser or resume state, no training image. ``dermpipe export``
adds each network's ONNX export beside its weights (``best.onnx``, ``meta.onnx``: protobuf, no code) and lists them in
SHA256SUMS. A bundle whose files do not match SHA256SUMS, or that holds any other kind of file, is refused before
anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tarfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from dermpipe import __version__
from dermpipe.configs.schema import ROOT_LAYOUT
from dermpipe.data.manifest import Manifest, ManifestError
from dermpipe.engine.checkpoint import CheckpointError, read_metadata
from dermpipe.engine.files import atomic_path, file_digest, remove_stale_temporaries
from dermpipe.engine.loop import read_metrics
from dermpipe.errors import DermpipeError

logger = logging.getLogger(__name__)

FORMAT = "dermpipe-bundle"
FORMAT_VERSION = 1
INFO_FILE = "bundle.json"
CARD_FILE = "MODEL_CARD.md"
CHECKSUMS = "SHA256SUMS"
# what a bundle may hold: weights as safetensors, their ONNX exports, and text; anything else (a pickle, a script) is
# refused
ALLOWED_SUFFIXES = (".safetensors", ".onnx", ".json", ".yaml", ".md", ".csv", ".txt")
# files derived from the bundle's own (the ONNX exports): listed and verified, but left out of its identity
DERIVED_SUFFIXES = (".onnx",)
# files copied from each stage's run folder when present (the weights are required)
STAGE_FILES = {
    "segmentation": ("best.safetensors", "config.yaml", "metrics.csv"),
    "classification": ("best.safetensors", "config.yaml", "metrics.csv", "metrics_test.json"),
    "ensemble": ("meta.safetensors", "config.yaml", "summary.json", "methods.csv"),
}
LIBRARIES = ("torch", "torchvision", "timm", "segmentation-models-pytorch", "numpy", "opencv-python-headless",
             "safetensors", "scikit-learn", "albumentations")  # fmt: skip


class BundleError(DermpipeError):
    """A bundle that cannot be made from a root, or cannot be trusted (tampered, foreign files, wrong format)."""


@dataclass(frozen=True)
class Bundle:
    """A verified bundle folder: its path, its hash (``identity_digest`` of its SHA256SUMS) and its bundle.json."""

    path: Path
    digest: str
    info: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.info.get("name") or self.path.name)

    @property
    def identity(self) -> str:
        """``name@sha256:<12 hex>``: what predictions.csv and the report name."""
        return f"{self.name}@sha256:{self.digest[:12]}"

    def stage_paths(self) -> dict[str, str]:
        """The PredictConfig paths of the trained stages inside the bundle."""
        return {
            "segmentation_run": str(self.path / ROOT_LAYOUT["segmentation"]),
            "classification_root": str(self.path / ROOT_LAYOUT["classification"]),
            "ensemble_run": str(self.path / ROOT_LAYOUT["ensemble"]),
        }


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


def _bundle_info(name: str, root: Path, files: Mapping[str, Path], vote: Mapping[str, Any]) -> dict[str, Any]:
    seg_meta = read_metadata(files["segmentation/best.safetensors"])
    backbones = {}
    crops = None
    manifest_path = None
    for backbone in vote["backbones"]:
        meta = read_metadata(files[f"classification/{backbone}/best.safetensors"])
        backbones[backbone] = {k: meta.get(k) for k in ("backbone", "input_size", "mean", "std", "se_reduction",
                                                         "preprocess", "drop_rate", "fold_models")}  # fmt: skip
        crops = crops or meta.get("crops")
        config = files.get(f"classification/{backbone}/config.yaml")
        if manifest_path is None and config is not None:
            manifest_path = (yaml.safe_load(config.read_text()) or {}).get("data", {}).get("manifest")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_root": root.name,
        "classes": list(vote["classes"]),
        "backbones": list(vote["backbones"]),
        "segmentation": {
            k: seg_meta.get(k)
            for k in ("architecture", "encoder", "input_size", "decoder_channels", "preprocess", "mean", "std")
        },  # fmt: skip
        "classifiers": backbones,
        "crops": crops,
        "vote": {k: vote.get(k) for k in ("init", "anchor", "hidden", "weight_decay", "inputs", "fit_split")},
        "calibration": {
            k: vote.get(k) for k in ("temperature", "refer", "refer_class", "refer_threshold", "target_sensitivity")
        },  # fmt: skip
        "training_data": {
            "manifest": Path(manifest_path).name if manifest_path else None,
            "images": _class_counts(manifest_path),
        },  # fmt: skip
        "versions": _versions(),
    }


def _checksums(folder: Path) -> str:
    lines = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS):
        lines.append(f"{file_digest(path)}  {path.relative_to(folder).as_posix()}\n")
    return "".join(lines)


def write_bundle(root: str | os.PathLike, out: str | os.PathLike, archive: bool = False) -> Bundle:
    """Copy the trained stages of ``root`` into a new bundle folder ``out`` (and ``out.tar.gz`` with ``archive``).

    The folder is assembled beside ``out`` and renamed into place when whole; an existing ``out`` is refused.
    """
    from dermpipe.ensemble.card import model_card

    root, out = Path(root), Path(out)
    if out.exists() or out.is_symlink():
        raise BundleError(f"{out} already exists: pass another --out (a bundle is never overwritten)")
    files, vote = _stage_sources(root)
    info = _bundle_info(out.name, root, files, vote)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out.parent, recursive=False)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        for rel, src in files.items():
            (partial / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, partial / rel)
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


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _read_metrics(seg_dir: Path) -> list[dict[str, str]]:
    return read_metrics(seg_dir / "metrics.csv", (), 10**9)


def _refuse(path: Path, why: str) -> BundleError:
    return BundleError(f"bundle {path} refused: {why}; make a new one with `dermpipe bundle --root ROOT --out NAME`")


def _listed(path: Path, text: str) -> dict[str, str]:
    listed: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        bad = not sep or len(digest) != 64 or rel.startswith("/") or ".." in Path(rel).parts or "\\" in rel
        if bad:
            raise _refuse(path, f"{CHECKSUMS} line {number} is not '<sha256>  <relative path>'")
        listed[rel] = digest
    return listed


def open_bundle(path: str | os.PathLike) -> Bundle:
    """Verify a bundle folder against its SHA256SUMS and return it; anything not as written is refused."""
    path = Path(path)
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        raise BundleError(f"{path} is a bundle archive: unpack it first (`tar xzf {path}`) and pass the folder")
    if not path.is_dir():
        raise BundleError(f"model bundle {path} not found: make one with `dermpipe bundle --root ROOT --out {path}`")
    sums = path / CHECKSUMS
    if not sums.is_file():
        raise _refuse(path, f"no {CHECKSUMS} (not a bundle, or an incomplete copy)")
    listed = _listed(path, sums.read_text(errors="replace"))
    present: dict[str, Path] = {}
    for entry in sorted(path.rglob("*")):
        rel = entry.relative_to(path).as_posix()
        if entry.is_symlink():
            raise _refuse(path, f"{rel} is a symbolic link")
        if entry.is_dir():
            continue
        if not entry.is_file():
            raise _refuse(path, f"{rel} is not a regular file")
        if rel != CHECKSUMS:
            present[rel] = entry
    for rel in present:
        if not rel.endswith(ALLOWED_SUFFIXES):
            raise _refuse(path, f"{rel} is not safetensors, ONNX or text (a bundle holds nothing else)")
        if rel not in listed:
            raise _refuse(path, f"{rel} is not listed in {CHECKSUMS} (added after bundling)")
    for rel, digest in listed.items():
        if rel not in present:
            raise _refuse(path, f"{rel} is listed in {CHECKSUMS} but missing")
        if file_digest(present[rel]) != digest:
            raise _refuse(path, f"{rel} does not match its sha256 in {CHECKSUMS} (changed after bundling)")
    try:
        info = json.loads((path / INFO_FILE).read_text())
    except (OSError, ValueError):
        raise _refuse(path, f"{INFO_FILE} is missing or not JSON") from None
    if info.get("format") != FORMAT or int(info.get("format_version", 0)) > FORMAT_VERSION:
        raise _refuse(path, f"{INFO_FILE} is not a {FORMAT} of version {FORMAT_VERSION} or older")
    return Bundle(path, identity_digest(sums.read_bytes()), info)


def _is_derived(line: bytes) -> bool:
    """Whether a SHA256SUMS line lists a derived file (an ONNX export)."""
    return line.rstrip(b"\r\n").endswith(tuple(s.encode() for s in DERIVED_SUFFIXES))


def identity_digest(sums: bytes) -> str:
    """The bundle's hash: the sha256 of its SHA256SUMS without the lines of derived files, so exporting the networks
    to ONNX keeps the bundle's identity (a bundle without them: the sha256 of the file's very bytes)."""
    kept = b"".join(line for line in sums.splitlines(keepends=True) if not _is_derived(line))
    return hashlib.sha256(kept).hexdigest()


def bundle_checksums(bundle: Bundle) -> dict[str, str]:
    """Each file SHA256SUMS lists -> its sha256."""
    return _listed(bundle.path, (bundle.path / CHECKSUMS).read_text())


def bundle_files(bundle: Bundle) -> Sequence[str]:
    """The bundle's files as SHA256SUMS lists them."""
    return sorted(bundle_checksums(bundle))
