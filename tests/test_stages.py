"""Each stage as a library call on its config, returning a typed result: what `dermpipe run` composes in one
process, checked against the files the stage writes."""

from __future__ import annotations

import csv
import json

import pytest

from dermpipe.classification import stage as classification
from dermpipe.classification.config import ClassificationConfig
from dermpipe.configs.loader import default_config_path, load_config
from dermpipe.data.generator import generate_dataset
from dermpipe.data.manifest import Manifest, ManifestError
from dermpipe.ensemble import stage as ensemble
from dermpipe.ensemble.config import EnsembleConfig
from dermpipe.pipeline.run import crop_trained
from dermpipe.segmentation import stage as segmentation
from dermpipe.segmentation.config import SegmentationConfig

pytestmark = pytest.mark.e2e  # trains every stage (tiny): left out of `make test-fast`

SEG = ["model.encoder=tu-test_resnet", "model.encoder_weights=null", "model.decoder_channels=[16,8,8,8,8]",
       "data.image_size=32", "train.batch_size=16", "train.panel_images=0", "train.epochs=1"]  # fmt: skip
CLS = ["model.pretrained=false", "data.image_size=32", "train.batch_size=16", "train.gradcam_images=0",
       "train.epochs=1", "run.threads=1"]  # fmt: skip
BACKBONES = ("test_resnet", "test_efficientnet")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_each_stage_call_returns_what_its_files_say(tmp_path):
    manifest = generate_dataset(tmp_path / "data", n_images=80, size=64, seed=0)
    root = {"run.root": str(tmp_path / "root"), "run.device": "cpu"}
    seg_cfg = load_config(SegmentationConfig, default_config_path("segmentation"), SEG,
                          {**root, "data.manifest": str(manifest)})  # fmt: skip
    seg = segmentation.train(seg_cfg)
    rows = _rows(seg.run_dir / "metrics.csv")
    assert seg.epochs_run == len(rows) == 1 and seg.checkpoint == seg.run_dir / "best.safetensors"
    assert seg.best_val_jaccard == pytest.approx(float(rows[0]["val_jaccard"]), abs=1e-6)
    assert segmentation.train(seg_cfg) == seg  # finished with these settings: reused, the same result

    crops = crop_trained(tmp_path / "root", str(manifest), ["predict.crop_size=32"], root)
    assert crops.manifest == crops.out / "crops.csv" and crops.cropped == len(Manifest.read(manifest)) == 80
    assert crops.skipped == 0 and crops.computed + crops.reused >= crops.cropped

    trained = []
    for backbone in BACKBONES:
        cfg = load_config(ClassificationConfig, default_config_path("classification"), CLS,
                          {**root, "model.backbone": backbone})  # fmt: skip
        result = classification.train(cfg)
        test = json.loads((result.run_dir / "metrics_test.json").read_text())
        assert result.backbone == backbone and result.checkpoint.is_file() and not result.combined
        assert result.test_balanced_accuracy == pytest.approx(test["balanced_accuracy"])
        trained.append(result)

    ens_cfg = load_config(EnsembleConfig, default_config_path("ensemble"),
                          ["meta.epochs=30", "meta.cv_folds=2", "evaluation.bootstrap=50"], root)  # fmt: skip
    vote = ensemble.vote(ens_cfg)  # no backbones named: every one trained under the root
    methods = {r["method"]: float(r["balanced_accuracy"]) for r in _rows(vote.run_dir / "methods.csv")}
    assert sorted(vote.backbones) == sorted(BACKBONES) and vote.n_test > 0
    assert vote.balanced_accuracy == pytest.approx(methods, abs=1e-6)
    assert vote.balanced_accuracy["test_resnet"] == pytest.approx(trained[0].test_balanced_accuracy, abs=1e-6)
    assert "meta-network balanced accuracy" in vote.line() and vote.best_single in BACKBONES


def test_a_stage_call_refuses_a_missing_manifest_before_any_folder(tmp_path):
    cfg = load_config(SegmentationConfig, default_config_path("segmentation"), SEG,
                      {"run.root": str(tmp_path / "root"), "data.manifest": str(tmp_path / "none.csv")})  # fmt: skip
    with pytest.raises(ManifestError):
        segmentation.train(cfg)
    assert not (tmp_path / "root").exists()
