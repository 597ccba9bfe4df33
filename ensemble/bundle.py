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

A root is bundled only whole: no stage stale (``engine.lineage.stale_stages``), the vote fitted on the classifiers it
packs, those classifiers trained on crops of the U-Net it packs. Every metric block of bundle.json (``metrics``, and
``calibration``) names the sha256 of the model(s) it scored, taken from the stages' lineage. bundle.json describes
the weights, it never steers them (prediction reads classes, preprocessing, crops and calibration from the weights'
own metadata): at every load it is recomputed from the bundled files, and a bundle whose bundle.json disagrees with
them, or whose metric digests are not those of its weights, is refused naming the value.
"""

from __future__ import annotations

import csv
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
from dermpipe.classification.ood import OOD_FILE, ood_description
from dermpipe.configs.schema import ROOT_LAYOUT
from dermpipe.data.manifest import Manifest, ManifestError
from dermpipe.engine.checkpoint import CheckpointError, read_metadata
from dermpipe.engine.files import atomic_path, file_digest, remove_stale_temporaries
from dermpipe.engine.lineage import read_lineage, short, stale_stages
from dermpipe.errors import DermpipeError

logger = logging.getLogger(__name__)

FORMAT = "dermpipe-bundle"
FORMAT_VERSION = 2  # 2: metric blocks name the digests of the models they scored (a version 1 bundle is refused)
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
    "classification": ("best.safetensors", "config.yaml", "metrics.csv", "metrics_test.json", "ood.safetensors"),
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


UNET = "segmentation/best.safetensors"
META = "ensemble/meta.safetensors"
# weights_source: where training started (which ImageNet weights, or from scratch), as the checkpoint recorded it
CLASSIFIER_KEYS = ("backbone", "input_size", "mean", "std", "se_reduction", "preprocess", "drop_rate", "fold_models",
                   "weights_source")  # fmt: skip
SEGMENTATION_KEYS = ("architecture", "encoder", "input_size", "decoder_channels", "preprocess", "mean", "std",
                     "weights_source")  # fmt: skip
CALIBRATION_KEYS = ("temperature", "refer", "refer_class", "refer_threshold", "target_sensitivity")
CLASSIFIER_SCORES = ("balanced_accuracy", "accuracy", "macro_f1", "macro_auc", "n_images")
# the methods of the vote's comparison scored by the learned vote itself (its weights and the backbones under it)
VOTE_METHODS = ("meta_network", "meta_network_calibrated")
# bundle.json's keys that describe the bundled files: recomputed from them at every load, a disagreement refused
DESCRIBED = ("classes", "backbones", "segmentation", "classifiers", "crops", "vote", "calibration", "metrics")
# every key bundle.json holds; the others describe the bundle (name: its identity) or what is not in it (the training
# manifest's counts, the library versions) and steer nothing
INFO_KEYS = ("format", "format_version", "name", "created", "source_root", *DESCRIBED, "training_data", "versions")


def classifier_weights(backbone: str) -> str:
    """A backbone's weights inside a bundle."""
    return f"{ROOT_LAYOUT['classification']}/{backbone}/best.safetensors"


def _segmentation_scores(path: Path | None) -> dict[str, Any] | None:
    """The U-Net's best epoch in its metrics.csv (by validation Jaccard, as the best checkpoint is chosen)."""
    if path is None or not path.is_file():
        return None
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_jaccard")]
    if not rows:
        return None
    best = max(rows, key=lambda r: _float(r["val_jaccard"]) or 0.0)
    return {"epoch": best.get("epoch"), "val_jaccard": _float(best["val_jaccard"]),
            "val_dice": _float(best.get("val_dice"))}  # fmt: skip


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _scores(files: Mapping[str, Path], backbones: Sequence[str]) -> dict[str, Any]:
    """The metric blocks of bundle.json (no digests yet): the U-Net's validation Jaccard, each backbone's test scores,
    the vote's test comparison, each from the metric file its stage wrote."""
    scores: dict[str, Any] = {}
    segmentation = _segmentation_scores(files.get("segmentation/metrics.csv"))
    if segmentation:
        scores["segmentation"] = segmentation
    classifiers = {}
    for backbone in backbones:
        report = _read_json(files.get(f"{ROOT_LAYOUT['classification']}/{backbone}/metrics_test.json"))
        if report:
            classifiers[backbone] = {k: report.get(k) for k in CLASSIFIER_SCORES}
    if classifiers:
        scores["classifiers"] = classifiers
    summary = _read_json(files.get("ensemble/summary.json"))
    if summary.get("methods"):
        scores["vote"] = {
            "n_test": summary.get("n_test"),
            "best_single": summary.get("best_single"),
            "methods": summary["methods"],
            "referral_test": summary.get("referral_test") or {},
            "target_sensitivity": summary.get("target_sensitivity"),
            "target_missed": summary.get("target_missed"),
        }
    return scores


def _described(files: Mapping[str, Path]) -> dict[str, Any]:
    """What bundle.json says about the bundled files, computed from them alone (the weights' own metadata and the
    metric files; metric digests apart): written at bundling, recomputed and compared at every load."""
    vote = read_metadata(files[META])
    seg_meta = read_metadata(files[UNET])
    backbones = list(vote["backbones"])
    classifiers = {}
    crops = None
    for backbone in backbones:
        meta = read_metadata(files[classifier_weights(backbone)])
        classifiers[backbone] = {k: meta.get(k) for k in CLASSIFIER_KEYS}
        ood = files.get(f"{ROOT_LAYOUT['classification']}/{backbone}/{OOD_FILE}")
        if ood:  # the out-of-distribution check's statistics (a bundle of older classifiers has none)
            classifiers[backbone]["ood"] = ood_description(ood, files[classifier_weights(backbone)])
        crops = crops or meta.get("crops")
    described = {
        "classes": list(vote["classes"]),
        "backbones": backbones,
        "segmentation": {k: seg_meta.get(k) for k in SEGMENTATION_KEYS},
        "classifiers": classifiers,
        "crops": crops,
        "vote": {k: vote.get(k) for k in ("init", "anchor", "hidden", "weight_decay", "inputs", "fit_split")},
        "calibration": {k: vote.get(k) for k in CALIBRATION_KEYS},
        "metrics": _scores(files, backbones),
    }
    return json.loads(json.dumps(described, default=str))  # as bundle.json holds it


def _with_digests(described: dict[str, Any], digests: Mapping[str, str]) -> dict[str, Any]:
    """``described`` with each metric block naming the sha256 of what it scored (``digests``: bundle path of each
    weights file -> sha256): ``model_digest`` of one model, ``model_digests`` (role -> sha256) of several."""
    backbones = described["backbones"]
    models = {b: digests[classifier_weights(b)] for b in backbones}
    scores = described["metrics"]
    if "segmentation" in scores:
        scores["segmentation"]["model_digest"] = digests[UNET]
    for backbone, block in (scores.get("classifiers") or {}).items():
        block["model_digest"] = models[backbone]
    if "vote" in scores:
        vote = scores["vote"]
        vote["model_digests"] = {"meta": digests[META], **models}
        for row in vote["methods"]:
            method = row.get("method")
            if method in VOTE_METHODS:
                row["model_digests"] = vote["model_digests"]
            elif method in models or method == "best_single" and vote.get("best_single") in models:
                single = method if method in models else vote["best_single"]
                row["model_digests"] = {single: models[single]}
            else:  # a baseline vote over the backbones (its own fitted weights, if any, are not bundled)
                row["model_digests"] = models
    described["calibration"]["model_digest"] = digests[META]
    return described


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
    from dermpipe.ensemble.card import card_warnings, model_card

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


def _read_json(path: Path | None) -> dict[str, Any]:
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def _read_metrics(seg_dir: Path) -> list[dict[str, str]]:
    if not (seg_dir / "metrics.csv").is_file():
        return []
    with open(seg_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


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
    if int(info.get("format_version", 0)) < FORMAT_VERSION:
        raise _refuse(path, f"{INFO_FILE} is of version {info.get('format_version')}, made before its metrics named "
                            "the models they scored")  # fmt: skip
    _check_described(path, info, present, listed)
    return Bundle(path, identity_digest(sums.read_bytes()), info)


def _check_described(
    path: Path, info: Mapping[str, Any], present: Mapping[str, Path], listed: Mapping[str, str]
) -> None:
    """Refuse a bundle.json that says anything else about the bundled files than they say themselves (classes, their
    order, backbones, preprocessing, crops, calibration and refer threshold, metric figures), or whose metric blocks
    name other digests than those of the bundled weights: an edit there is never silently ignored."""
    try:
        expected = _described(present)
        weights = [UNET, META, *map(classifier_weights, expected["backbones"])]
        expected = _with_digests(expected, {rel: listed[rel] for rel in weights})
    except (CheckpointError, KeyError, ValueError) as e:
        raise _refuse(path, f"its weights or metric files cannot be read ({e})") from None
    unknown = sorted(set(info) - set(INFO_KEYS))
    if unknown:
        raise _refuse(path, f"{INFO_FILE} holds {', '.join(unknown)}, which no dermpipe bundle has (added by hand?)")
    for key in DESCRIBED:
        where = _first_difference(info.get(key), expected[key], key)
        if where is not None:
            dotted, have, want = where
            if dotted.rsplit(".", 1)[-1].startswith("model_digest"):
                why = f"names model {have} but the bundled weights are {want}"
            else:
                why = f"is {have} but the bundled files say {want} (what prediction uses)"
            raise _refuse(path, f"{INFO_FILE} {dotted} {why}")


def _first_difference(have: Any, want: Any, where: str) -> tuple[str, str, str] | None:
    """The first dotted path at which ``have`` and ``want`` (JSON values) differ, with both values as short text."""
    if isinstance(have, dict) and isinstance(want, dict):
        for key in [*want, *(k for k in have if k not in want)]:
            found = _first_difference(have.get(key), want.get(key), f"{where}.{key}")
            if found is not None:
                return found
        return None
    if isinstance(have, list) and isinstance(want, list) and len(have) == len(want):
        for i, (a, b) in enumerate(zip(have, want)):
            found = _first_difference(a, b, f"{where}[{i}]")
            if found is not None:
                return found
        return None
    if json.dumps(have, sort_keys=True) == json.dumps(want, sort_keys=True):
        return None
    return where, _shown(have), _shown(want)


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


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
