"""Training on two gloo processes under torchrun: the same validation metrics as one process with the same global
batch (within the tolerance BatchNorm's per-rank statistics leave), and rank 0 alone writing."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dermpipe.data.generator import generate_dataset

REPO = Path(__file__).resolve().parents[1]
# no augmentation and no dropout: what differs between one and two processes is then only BatchNorm's batch statistics
# (8 images per rank instead of 16) and the order of float sums
COMMON = ["--device", "cpu", "--set", "data.augment.enabled=false", "--set", "train.batch_size=16"]
STAGES = {
    "segmentation": (
        "segmentation/train.py",
        ["--epochs", "3", "--set", "model.encoder=tu-test_resnet", "--set", "model.encoder_weights=null",
         "--set", "model.decoder_channels=[16,8,8,8,8]", "--set", "data.image_size=32", "--set", "train.panel_images=0",
         "--set", "train.lr=0.005"],
        "val_jaccard",
    ),
    "classification": (
        "classification/train.py",
        ["--backbone", "test_resnet", "--no-crop", "--epochs", "3", "--set", "model.pretrained=false",
         "--set", "model.drop_rate=0", "--set", "data.image_size=32", "--set", "train.gradcam_images=0"],
        "val_balanced_accuracy",
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("data"), n_images=96, size=48, seed=0)


def train(stage: str, manifest: Path, root: Path, processes: int) -> subprocess.CompletedProcess:
    script, extra, _ = STAGES[stage]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    argv = [*(launcher if processes > 1 else [sys.executable]), str(REPO / script), "--manifest", str(manifest),
            "--root", str(root), *COMMON, *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)


def metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.e2e
@pytest.mark.parametrize("stage", list(STAGES))
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(stage, manifest, tmp_path):
    one, two = train(stage, manifest, tmp_path / "one", 1), train(stage, manifest, tmp_path / "two", 2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    sub = stage if stage == "segmentation" else "classification/test_resnet"
    rows_one, rows_two = metrics(tmp_path / "one" / sub), metrics(tmp_path / "two" / sub)
    assert [r["epoch"] for r in rows_two] == ["1", "2", "3"]  # one row per epoch: rank 0 alone writes
    monitor = STAGES[stage][2]
    for a, b in zip(rows_one, rows_two):
        assert abs(float(a[monitor]) - float(b[monitor])) <= 0.1, (a, b)
        assert abs(float(a["train_loss"]) - float(b["train_loss"])) <= 0.1 * float(a["train_loss"]), (a, b)
    log = (tmp_path / "two" / sub / "train.log").read_text()
    assert log.count("epoch 3/3:") == 1  # one log, written by rank 0
    assert sum(line.startswith(stage) for line in two.stdout.splitlines()) == 1  # one summary line, from rank 0
