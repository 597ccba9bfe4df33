"""The quick start sequence (docs/quickstart.md's first code block; README.md's quick start is the same block,
tests/test_docs.py), run verbatim by bash in a fresh folder (tiny sizes added through `--set`), then `dermpipe run` on
the same manifest, then the bundle: predicted from another folder, and refused once tampered."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dermpipe.data.generator import generate_dataset
from dermpipe.data.manifest import Manifest
from dermpipe.pipeline.demo import write_photo_folder

pytestmark = pytest.mark.e2e  # whole pipelines trained: left out of `make test-fast`

REPO = Path(__file__).resolve().parents[1]
DERMPIPE = Path(sys.executable).parent / "dermpipe"

# What the test adds to each quick start line: tiny networks from scratch, one training step an epoch, so the
# sequence runs in a couple of minutes.
SEG = ("--epochs 1 --set model.encoder=tu-test_resnet --set model.encoder_weights=null "
       "--set model.decoder_channels=[16,8,8,8,8] --set data.image_size=32 --set train.batch_size=16 "
       "--set train.panel_images=0 --set train.max_steps_per_epoch=1")  # fmt: skip
CLS = "--epochs 1 --set model.pretrained=false --set data.image_size=80 --set train.batch_size=16 --set " \
      "train.gradcam_images=0 --set run.threads=1 --set train.max_steps_per_epoch=1"  # fmt: skip
VOTE = "--set meta.epochs=30 --set meta.cv_folds=2 --set evaluation.bootstrap=50"
TINY = {
    "segmentation/train.py": SEG,
    "segmentation/predict.py": "--set predict.crop_size=64",
    "classification/train.py": CLS,
    "ensemble/vote.py": VOTE,
}
WRAPPERS = f"""
set -euo pipefail
python() {{
  local script=$1; shift
  local extra=""
  case $script in
{"".join(f"    {k}) extra='{v}';;{chr(10)}" for k, v in TINY.items())}  esac
  "{sys.executable}" "{REPO}/$script" "$@" $extra
}}
dermpipe() {{ "{DERMPIPE}" "$@"; }}
"""


QUICKSTART = REPO / "docs" / "quickstart.md"


def quickstart_sequence() -> str:
    """The first code block of docs/quickstart.md."""
    return re.search(r"```\n(.*?)```", QUICKSTART.read_text(encoding="utf-8"), re.S).group(1)


def ham10000_layout(folder: Path, data: Path) -> None:
    """The synthetic set laid out as HAM10000 is published (images, tschandl masks, metadata CSV)."""
    manifest = Manifest.read(generate_dataset(data, n_images=44, size=96, seed=0))
    images, masks = folder / "HAM10000_images_part_1", folder / "HAM10000_segmentations_lesion_tschandl"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    with open(folder / "HAM10000_metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset"])
        for i, row in enumerate(manifest.rows):
            image_id = f"ISIC_{i:07d}"
            shutil.copyfile(row["image_path"], images / f"{image_id}.jpg")
            shutil.copyfile(row["mask_path"], masks / f"{image_id}_segmentation.png")
            writer.writerow([row["group"], image_id, row["label"], "histo", "", "", "", "synthetic"])


def bash(script: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(cwd / "home")}
    return subprocess.run(["bash", "-c", WRAPPERS + script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=1500)  # fmt: skip


def rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {r["image_id"]: {k: v for k, v in r.items() if k not in ("path", "model")} for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("quickstart")
    ham10000_layout(work / "home" / "HAM10000", work / "synthetic")
    write_photo_folder(work / "photos", 6, 96, seed=123)  # new photos (and one that is not), none seen in training
    done = bash("PS4='+ $(date +%s) '; set -x; " + quickstart_sequence(), work)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    (work / "sequence.log").write_text(done.stderr)
    return work


def test_quickstart_sequence_runs_as_written_under_one_root(world: Path) -> None:
    root = world / "runs" / "ham"
    assert (world / "runs" / "ham.csv").is_file()
    for backbone in ("resnet50", "densenet169", "inception_v3", "inception_resnet_v2", "xception"):
        assert (root / "classification" / backbone / "best.safetensors").is_file()
    assert (root / "segmentation" / "best.safetensors").is_file() and (root / "crops" / "crops.csv").is_file()
    assert (root / "ensemble" / "meta.safetensors").is_file() and (root / "cache").is_dir()
    assert {p.name for p in (root / "cache").iterdir()} >= {"crops", "crop_probabilities"}  # under the root named
    predicted = rows(world / "predictions.csv")
    assert sorted(predicted) == sorted(p.stem for p in (world / "photos").iterdir() if p.stem != "notes")
    assert "notes.jpg" in (root / "predict" / "skipped.csv").read_text()


def test_dermpipe_run_on_the_same_manifest_reuses_every_stage(world: Path) -> None:
    root = world / "runs" / "ham"
    watched = [root / "segmentation" / "best.safetensors", root / "classification" / "xception" / "best.safetensors",
               root / "ensemble" / "meta.safetensors"]  # fmt: skip
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in watched}
    stage = {"segmentation/train.py": "segmentation", "segmentation/predict.py": "segmentation",
             "classification/train.py": "classification", "ensemble/vote.py": "ensemble"}  # fmt: skip
    sets = " ".join(
        f"--set {stage[script]}.{item}" for script in ("segmentation/train.py", "segmentation/predict.py",
                                                       "classification/train.py", "ensemble/vote.py")
        for item in re.findall(r"--set (\S+)", TINY[script])
    )  # fmt: skip
    sets += " --set segmentation.train.epochs=1 --set classification.train.epochs=1"
    done = bash(f"dermpipe run --manifest runs/ham.csv --root runs/ham {sets}", world)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in watched} == before  # reused, not retrained
    table = (root / "summary.md").read_text()
    assert "| segmentation | U-Net, val Jaccard at epoch 1 |" in table and "| meta_network |" in table
    for backbone in ("resnet50", "densenet169", "inception_v3", "inception_resnet_v2", "xception"):
        assert f"| {backbone} |" in table
    assert "reusing it" in done.stderr


def test_bundle_predicts_the_same_rows_from_another_folder_and_is_refused_when_tampered(world: Path) -> None:
    bundle = world / "ham-v1"
    assert (bundle / "MODEL_CARD.md").is_file() and (bundle / "SHA256SUMS").is_file()
    assert not list(bundle.rglob("*.pt")) and not list(bundle.rglob("last*"))  # weights only, no optimiser state
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "not a medical device" in card and "| nv |" in card and "meta_network" in card
    from_root, from_bundle = rows(world / "predictions.csv"), rows(world / "from-bundle" / "predictions.csv")
    assert from_bundle == from_root
    with open(world / "from-bundle" / "predictions.csv", newline="") as f:
        assert {r["model"] for r in csv.DictReader(f)} == {f"ham-v1@sha256:{_bundle_hash(bundle)}"}

    elsewhere = world / "colleague"
    elsewhere.mkdir()
    moved = elsewhere / "ham-v1"
    shutil.copytree(bundle, moved)
    done = bash("dermpipe predict --model ham-v1 --input ../photos --out out", elsewhere)
    assert done.returncode == 0, done.stderr[-3000:]
    assert rows(elsewhere / "out" / "predictions.csv") == from_root

    kept = (elsewhere / "out" / "predictions.csv").read_bytes()
    weights = moved / "classification" / "xception" / "best.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    done = bash("dermpipe predict --model ham-v1 --input ../photos --out out", elsewhere)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "error: bundle ham-v1 refused: classification/xception/best.safetensors does not match its sha256 in "
        "SHA256SUMS (changed after bundling); make a new one with `dermpipe bundle --root ROOT --out NAME`"
    )
    assert (elsewhere / "out" / "predictions.csv").read_bytes() == kept  # a refused run changes nothing

    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    (moved / "ensemble" / "extra.pt").write_bytes(b"not weights")
    done = bash("dermpipe predict --model ham-v1 --input ../photos --out out", elsewhere)
    assert done.returncode == 2 and "ensemble/extra.pt is not safetensors, ONNX or text" in done.stderr


def _bundle_hash(bundle: Path) -> str:
    import hashlib

    return hashlib.sha256((bundle / "SHA256SUMS").read_bytes()).hexdigest()[:12]
