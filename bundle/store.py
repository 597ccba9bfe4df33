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

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dermpipe.bundle.describe import (
    DESCRIBED,
    INFO_KEYS,
    META,
    UNET,
    _described,
    _with_digests,
    classifier_weights,
)
from dermpipe.configs.schema import ROOT_LAYOUT
from dermpipe.engine.checkpoint import CheckpointError
from dermpipe.engine.files import file_digest
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
INT8_RECORD = "int8.json"  # the int8 export's gate figures and calibration images (predict/int8_export.py)
DERIVED_SUFFIXES = (".onnx", f"  {INT8_RECORD}")


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
