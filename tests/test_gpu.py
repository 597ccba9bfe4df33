"""The GPU path: mixed precision (bfloat16, float16 with its scaler), channels_last, torch.compile, and DDP over NCCL.
Skipped without a CUDA GPU; `benchmarks/gpu_check.sh` runs them on one."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dermpipe.data.generator import generate_dataset

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
REPO = Path(__file__).resolve().parents[1]
SEG = ["segmentation/train.py", "--epochs", "2", "--set", "model.encoder=tu-test_resnet",
       "--set", "model.encoder_weights=null", "--set", "model.decoder_channels=[16,8,8,8,8]",
       "--set", "data.image_size=64", "--set", "train.panel_images=0"]  # fmt: skip
CLS = ["classification/train.py", "--backbone", "resnet18", "--no-crop", "--epochs", "2", "--set",
       "model.pretrained=false", "--set", "data.image_size=64", "--set", "train.gradcam_images=0"]  # fmt: skip


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("data"), n_images=96, size=96, seed=0)


def train(argv: list[str], manifest: Path, root: Path, *extra: str, processes: int = 1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*(launcher if processes > 1 else [sys.executable]), str(REPO / argv[0]), *argv[1:],
               "--manifest", str(manifest), "--root", str(root), "--device", "cuda", *extra]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def last_row(run_dir: Path) -> dict[str, str]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))[-1]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("stage", ["segmentation", "classification"])
def test_mixed_precision_and_channels_last_train_to_finite_scores(stage, dtype, manifest, tmp_path):
    argv = SEG if stage == "segmentation" else CLS
    train(argv, manifest, tmp_path, "--set", f"run.amp_dtype={dtype}", "--set", "run.channels_last=true")
    sub = "segmentation" if stage == "segmentation" else "classification/resnet18"
    row = last_row(tmp_path / sub)
    assert all(float(row[k]) == float(row[k]) for k in ("train_loss", "val_loss"))  # not NaN
    assert "amp=True, channels_last=True" in (tmp_path / sub / "train.log").read_text()


def test_compiled_training_matches_eager_closely(manifest, tmp_path):
    train(CLS, manifest, tmp_path / "eager", "--set", "run.amp=false")
    train(CLS, manifest, tmp_path / "compiled", "--set", "run.amp=false", "--set", "run.compile=true")
    eager = last_row(tmp_path / "eager" / "classification" / "resnet18")
    compiled = last_row(tmp_path / "compiled" / "classification" / "resnet18")
    assert abs(float(eager["train_loss"]) - float(compiled["train_loss"])) < 0.05 * float(eager["train_loss"])


@pytest.mark.parametrize("stage", ["segmentation", "classification"])
def test_ddp_over_nccl_on_every_gpu_present(stage, manifest, tmp_path):
    gpus = torch.cuda.device_count()
    argv = SEG if stage == "segmentation" else CLS
    done = train(argv, manifest, tmp_path, processes=max(gpus, 2) if gpus > 1 else 1)
    sub = "segmentation" if stage == "segmentation" else "classification/resnet18"
    assert last_row(tmp_path / sub)["epoch"] == "2"
    assert sum(line.startswith(stage) for line in done.stdout.splitlines()) == 1
