"""Finished work is never replaced unasked (other settings or data are refused, naming each key, unless --force), and
every stage records its lineage: the digests of what it consumed and produced; a root-predicted row names its models."""

import csv
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import write_untrained_pipeline

from dermpipe.classification import train as classify_script
from dermpipe.data.generator import generate_dataset
from dermpipe.data.manifest import Manifest
from dermpipe.engine.files import file_digest
from dermpipe.engine.lineage import read_lineage, stale_stages, write_lineage
from dermpipe.ensemble import vote as vote_script
from dermpipe.ensemble.meta import softmax
from dermpipe.pipeline import run as pipeline
from dermpipe.pipeline.demo import write_photo_folder
from dermpipe.predict import cli as predict_script
from dermpipe.segmentation import predict as segment_script
from dermpipe.segmentation import train as seg_script

pytestmark = pytest.mark.usefixtures("one_thread")

UNET = {"model": {"encoder": "tu-test_resnet", "encoder_weights": None, "decoder_channels": [16, 8, 8, 8, 8]},
        "data": {"image_size": 32}, "train": {"batch_size": 8, "panel_images": 0, "max_steps_per_epoch": 1},
        "predict": {"crop_size": 32}}  # fmt: skip
CLASSIFIER = {"model": {"pretrained": False}, "data": {"image_size": 32},
              "train": {"epochs": 1, "batch_size": 8, "freeze_epochs": 0, "max_steps_per_epoch": 1}}  # fmt: skip


def _sets(section, prefix=""):
    """A config section as ``--set`` arguments."""
    out = []
    for key, value in section.items():
        if isinstance(value, dict):
            out += _sets(value, f"{prefix}{key}.")
        else:
            out += ["--set", f"{prefix}{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    return out


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the digest of its bytes."""
    return {p.relative_to(folder).as_posix(): file_digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("data"), n_images=24, size=48, seed=1, hair=0.0, ruler=0.0)


def _seg_args(manifest, out, *extra):
    return ["--manifest", str(manifest), "--out", str(out), "--device", "cpu", "--set", "run.threads=1",
            "--set", f"run.cache_dir={out.parent / 'cache'}", *_sets(UNET), *extra]  # fmt: skip


def test_segmentation_refuses_other_settings_or_data_naming_each_key_and_force_replaces_it(manifest, tmp_path, capsys):
    data = tmp_path / "ham.csv"
    Manifest.read(manifest).write(data)  # absolute paths: a copy of its own to change
    run = tmp_path / "segmentation"
    assert seg_script.main(_seg_args(data, run, "--epochs", "1")) == 0
    assert read_lineage(run) == {
        "stage": "segmentation",
        "consumed": {"manifest": file_digest(data)},
        "produced": {"weights": file_digest(run / "best.safetensors")},
    }
    before, old_digest = snapshot(run), file_digest(data)
    rows = Manifest.read(data)
    replace(rows, rows=tuple(reversed(rows.rows))).write(data)  # the same images, other bytes: other data
    capsys.readouterr()
    assert seg_script.main(_seg_args(data, run, "--epochs", "2")) == 2
    line = _error(capsys)
    assert f"{run} holds a finished U-Net made with other settings: " in line
    assert (
        "train.epochs 1 -> 2" in line
        and f"data.manifest digest {old_digest[:4]}.. -> {file_digest(data)[:4]}.." in line
    )
    assert "pass --force to replace it, or choose another --out/--root" in line
    assert snapshot(run) == before  # refused before anything in the folder was written

    assert seg_script.main(_seg_args(data, run, "--epochs", "2", "--force")) == 0
    assert (
        f"--force: replacing what {run} holds (a finished U-Net made with other settings: "
        in (run / "train.log").read_text()
    )
    with open(run / "metrics.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]  # trained afresh, not appended
    assert read_lineage(run)["consumed"] == {"manifest": file_digest(data)}
    assert read_lineage(run)["produced"] == {"weights": file_digest(run / "best.safetensors")}


def test_an_unfinished_run_with_other_settings_is_refused_unless_force(manifest, tmp_path, capsys, interrupt_epoch):
    run = tmp_path / "segmentation"
    restore = interrupt_epoch(2)
    assert seg_script.main(_seg_args(manifest, run, "--epochs", "2")) == 130  # Ctrl-C in epoch 2: unfinished
    restore()
    before = snapshot(run)
    capsys.readouterr()
    assert seg_script.main(_seg_args(manifest, run, "--epochs", "2", "--set", "train.lr=0.5")) == 2
    line = _error(capsys)
    assert "holds an unfinished U-Net training started with other settings: train.lr 0.001 -> 0.5" in line
    assert snapshot(run) == before
    assert seg_script.main(_seg_args(manifest, run, "--epochs", "1", "--set", "train.lr=0.5", "--force")) == 0


def test_an_older_run_folder_that_records_no_settings_is_refused_without_naming_keys(manifest, tmp_path, capsys):
    run = tmp_path / "segmentation"
    assert seg_script.main(_seg_args(manifest, run, "--epochs", "1")) == 0
    state = torch.load(run / "last_state.pt", weights_only=True)
    del state["settings"]  # as runs made before settings were recorded, with other settings than these
    torch.save({**state, "fingerprint": "0123456789abcdef"}, run / "last_state.pt")
    before = snapshot(run)
    capsys.readouterr()
    assert seg_script.main(_seg_args(manifest, run, "--epochs", "1")) == 2
    assert _error(capsys) == (
        f"error: {run} holds a finished U-Net made with other settings (this older run folder does not record "
        "which); pass --force to replace it, or choose another --out/--root"
    )
    assert snapshot(run) == before


@pytest.fixture(scope="module")
def crops(tmp_path_factory, manifest):
    """A root with a U-Net, its crops and one classifier trained on them (each through its command)."""
    root = tmp_path_factory.mktemp("root")
    assert seg_script.main(_seg_args(manifest, root / "segmentation", "--epochs", "1")) == 0
    args = ["--manifest", str(manifest), "--root", str(root), "--device", "cpu", "--set", "run.threads=1"]
    assert segment_script.main([*args, *_sets(UNET)]) == 0
    classify = ["--backbone", "test_resnet", "--root", str(root), "--device", "cpu", "--set", "run.threads=1",
                *_sets(CLASSIFIER), "--set", "train.gradcam_images=2"]  # fmt: skip
    assert classify_script.main(classify) == 0
    return root, classify


def test_every_stage_records_the_digests_it_consumed_and_produced(crops, manifest):
    root, _ = crops
    unet, table = root / "segmentation" / "best.safetensors", root / "crops" / "crops.csv"
    assert read_lineage(root / "crops") == {
        "stage": "crops",
        "consumed": {"manifest": file_digest(manifest), "unet": file_digest(unet)},
        "produced": {"crops_manifest": file_digest(table)},
    }
    classifier = root / "classification" / "test_resnet"
    assert read_lineage(classifier) == {
        "stage": "classification",
        "consumed": {"crops_manifest": file_digest(table), "manifest": file_digest(manifest)},
        "produced": {"weights": file_digest(classifier / "best.safetensors")},
    }
    assert stale_stages(root, manifest) == []


def test_a_classifier_refuses_other_settings_and_force_replaces_its_grad_cam_overlays(crops, capsys):
    root, classify = crops
    folder = root / "classification" / "test_resnet"
    before = snapshot(folder)
    capsys.readouterr()
    assert classify_script.main([*classify, "--set", "train.lr=0.01", "--set", "model.drop_rate=0.5"]) == 2
    line = _error(capsys)
    assert f"{folder} holds a finished test_resnet classifier made with other settings: " in line
    assert "model.drop_rate 0.3 -> 0.5, train.lr 0.001 -> 0.01; pass --force" in line
    assert snapshot(folder) == before

    stale = folder / "gradcam" / "zz_pred-mel.png"  # an overlay of the model being replaced
    stale.write_bytes(sorted((folder / "gradcam").glob("*.png"))[0].read_bytes())
    assert classify_script.main([*classify, "--set", "train.lr=0.01", "--force"]) == 0
    assert "--force: replacing what" in (folder / "train.log").read_text()
    assert not stale.exists() and len(list((folder / "gradcam").glob("*.png"))) == 2
    assert read_lineage(folder)["produced"]["weights"] == file_digest(folder / "best.safetensors")
    assert classify_script.main(classify) == 2  # the first settings are now the other ones
    capsys.readouterr()
    # replaced again, drawing no overlays: the last model's go, none is left beside a model it does not show
    no_overlays = ["--set", "train.lr=0.02", "--set", "train.gradcam_images=0", "--force"]
    assert classify_script.main([*classify, *no_overlays]) == 0
    assert list((folder / "gradcam").glob("*.png")) == []


def _write_tables(folder: Path, backbones, seed: int) -> None:
    rng = np.random.default_rng(seed)
    classes = ["nv", "mel", "bcc"]
    for split, n in (("val", 90), ("test", 60)):
        labels = rng.integers(0, 3, n)
        for b, name in enumerate(backbones):
            z = rng.normal(size=(n, 3))
            z[np.arange(n), labels] += 1.5 - 0.5 * b
            probs = softmax(2 * z)
            (folder / name).mkdir(parents=True, exist_ok=True)
            with open(folder / name / f"probs_{split}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["image_id", "crop_key", "label", *classes])
                w.writerows([f"{split}{i}", f"k{split}{i}", classes[labels[i]], *map(str, probs[i])] for i in range(n))
            sidecar = {"backbone": name, "classes": classes, "split": split, "source": split, "trained_on": "train",
                       "weights_digest": f"w-{name}", "table_key": f"t-{name}-{split}"}  # fmt: skip
            (folder / name / f"probs_{split}.json").write_text(json.dumps(sidecar))


def test_the_vote_refuses_other_settings_naming_them_and_force_replaces_it(tmp_path, capsys):
    tables, out = tmp_path / "classification", tmp_path / "ensemble"
    _write_tables(tables, ("a", "b"), seed=0)
    args = ["--classification-root", str(tables), "--backbones", "a,b", "--out", str(out), "--device", "cpu",
            "--set", "meta.epochs=30", "--set", "meta.hidden_grid=[4]", "--set", "meta.weight_decay_grid=[0.001]",
            "--set", "meta.cv_folds=2", "--set", "evaluation.bootstrap=20", "--set", "run.threads=1",
            "--set", "calibration.refer=false"]  # fmt: skip
    assert vote_script.main(args) == 0
    digest = {f"tables:{b}:{s}": file_digest(tables / b / f"probs_{s}.csv") for b in "ab" for s in ("val", "test")}
    assert read_lineage(out) == {
        "stage": "vote",
        "consumed": digest,
        "produced": {"meta": file_digest(out / "meta.safetensors")},
    }
    before = snapshot(out)
    capsys.readouterr()
    assert vote_script.main([*args, "--set", "meta.selection_se=2"]) == 2
    assert "holds a finished vote made with other settings: meta.selection_se 1.0 -> 2.0; pass --force" in _error(
        capsys
    )
    assert snapshot(out) == before  # meta.safetensors, summary.json and every figure untouched

    _write_tables(tables, ("a", "b"), seed=1)  # retrained classifiers: other tables
    assert vote_script.main(args) == 2
    line = _error(capsys)
    assert "tables.val digest" in line and "tables.test digest" in line and "meta." not in line
    assert snapshot(out) == before
    assert vote_script.main([*args, "--force"]) == 0
    assert "--force: replacing what" in (out / "train.log").read_text()
    assert snapshot(out)["lineage.json"] != before["lineage.json"]  # refitted on the new tables, and says so
    assert read_lineage(out)["consumed"]["tables:a:val"] == file_digest(tables / "a" / "probs_val.csv")


def test_dermpipe_run_names_every_conflict_before_anything_trains(crops, manifest, tmp_path, capsys):
    root, _ = crops
    before = snapshot(root)
    config = tmp_path / "experiment.yaml"
    segmentation = {**UNET, "train": {**UNET["train"], "epochs": 2}}
    classifier = {**CLASSIFIER, "train": {**CLASSIFIER["train"], "epochs": 1}}
    config.write_text(yaml.safe_dump({"backbones": ["test_resnet"], "segmentation": segmentation,
                                      "classification": classifier}))  # fmt: skip
    capsys.readouterr()
    argv = ["--manifest", str(manifest), "--root", str(root), "--config", str(config), "--device", "cpu"]
    assert pipeline.main(argv) == 2
    captured = capsys.readouterr()
    assert "run: " not in captured.out  # no stage started
    lines = captured.err.strip().splitlines()
    assert len(lines) == 3, captured.err
    assert lines[0].startswith(f"{root / 'segmentation'} holds a finished U-Net made with other settings: ")
    assert "train.epochs 1 -> 2" in lines[0]
    assert lines[1] == (f"{root / 'classification' / 'test_resnet'} holds a finished test_resnet classifier "
                        "trained on crops of a U-Net that this run trains anew")  # fmt: skip
    assert lines[2].startswith("error: the 2 stage folders above hold runs made with other settings or data")
    assert snapshot(root) == before

    # the U-Net as it was, but crops of another margin: the classifier trained on the crops now there is named
    segmentation = {**UNET, "train": {**UNET["train"], "epochs": 1}, "predict": {**UNET["predict"], "margin": 0.3}}
    config.write_text(yaml.safe_dump({"backbones": ["test_resnet"], "segmentation": segmentation,
                                      "classification": classifier}))  # fmt: skip
    assert pipeline.main(argv) == 2
    line = _error(capsys)
    assert line.startswith(f"error: {root / 'classification' / 'test_resnet'} holds a finished test_resnet classifier")
    assert "trained on crops of other settings (segmentation.predict.margin 0.1 -> 0.3)" in line
    assert snapshot(root) == before


def test_a_stage_whose_input_changed_is_stale(tmp_path):
    root = tmp_path / "root"
    manifest, unet, table = tmp_path / "m.csv", root / "segmentation" / "best.safetensors", root / "crops" / "crops.csv"
    for path, text in ((manifest, "m"), (unet, "u"), (table, "c")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    weights = root / "classification" / "r18" / "best.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_text("w")
    write_lineage(
        root / "segmentation", "segmentation", {"manifest": file_digest(manifest)}, {"weights": file_digest(unet)}
    )
    write_lineage(root / "crops", "crops", {"manifest": file_digest(manifest), "unet": file_digest(unet)},
                  {"crops_manifest": file_digest(table)})  # fmt: skip
    write_lineage(
        weights.parent, "classification", {"crops_manifest": file_digest(table)}, {"weights": file_digest(weights)}
    )
    assert stale_stages(root, manifest) == []
    old = file_digest(unet)
    unet.write_text("u2")  # a U-Net retrained by hand: its crops and what was trained on them no longer match
    lines = stale_stages(root, manifest)
    assert lines == [
        f"segmentation/best.safetensors is {file_digest(unet)[:8]}.., not the {old[:8]}.. its lineage records "
        "(replaced by hand?): rerun `dermpipe run --force` or retrain it",
        f"crops was made from the U-Net {old[:8]}.. but the U-Net is now {file_digest(unet)[:8]}..: rerun "
        "`dermpipe run` or retrain it",
    ]
    table.write_text("c2")
    assert any(line.startswith("classification/r18 was made from the crops ") for line in stale_stages(root, manifest))
    (root / "crops" / "lineage.json").unlink()
    assert "crops has no lineage record" in stale_stages(root, manifest)[1]
    assert not any(line.startswith("crops ") for line in stale_stages(root, manifest, missing=False))


def test_a_row_predicted_from_a_run_root_names_the_digest_of_each_stage_model(tmp_path):
    stages = write_untrained_pipeline(tmp_path / "root", ["test_resnet"], ["nv", "mel", "bcc"])
    photos = tmp_path / "photos"
    write_photo_folder(photos, 2, 64, seed=0)
    out = tmp_path / "out"
    argv = ["--input", str(photos), "--out", str(out), "--device", "cpu", "--no-report",
            "--segmentation-run", str(stages / "seg"), "--classification-root", str(stages / "cls"),
            "--ensemble-run", str(stages / "ens"), "--set", f"run.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    assert predict_script.main(argv) == 0
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    files = {"unet": stages / "seg" / "best.safetensors", "vote": stages / "ens" / "meta.safetensors",
             "test_resnet": stages / "cls" / "test_resnet" / "best.safetensors"}  # fmt: skip
    short = {name: hashlib.sha256(path.read_bytes()).hexdigest()[:8] for name, path in files.items()}
    expected = f"{stages / 'ens'} [unet:{short['unet']} test_resnet:{short['test_resnet']} vote:{short['vote']}]"
    assert len(rows) == 2 and {r["model"] for r in rows} == {expected}
