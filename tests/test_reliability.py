"""A failed or refused command never changes a finished run; outputs are collision-free, order-stable and whole."""

import csv
import errno
import hashlib
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import write_untrained_pipeline

from dermpipe.data.generator import generate_dataset, make_sample
from dermpipe.engine.checkpoint import read_metadata
from dermpipe.engine.files import output_stem, remove_stale_temporaries
from dermpipe.predict import cli as predict_script
from dermpipe.segmentation import predict as segment_script
from dermpipe.segmentation import train as train_script

CLASSES = ["nv", "mel", "bcc"]
BACKBONES = ["test_resnet"]
TINY_UNET = [
    "--set", "model.encoder=tu-test_resnet", "--set", "model.encoder_weights=null",
    "--set", "model.decoder_channels=[16,8,8,8,8]", "--set", "data.image_size=32", "--set", "train.batch_size=8",
    "--set", "train.panel_images=0", "--set", "train.max_steps_per_epoch=1",
]  # fmt: skip


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the digest of its bytes."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _photos(folder: Path, names: list[str]) -> None:
    rng = np.random.default_rng(5)
    for i, name in enumerate(names):
        image, _ = make_sample(rng, CLASSES[i % len(CLASSES)], 64)
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    return write_untrained_pipeline(tmp_path_factory.mktemp("stages"), BACKBONES, CLASSES)


def _predict(stages: Path, folder: Path, out: Path, *extra: str) -> list[str]:
    return ["--input", str(folder), "--out", str(out), "--device", "cpu", "--segmentation-run", str(stages / "seg"),
            "--classification-root", str(stages / "cls"), "--ensemble-run", str(stages / "ens"),
            "--set", f"run.cache_dir={out.parent / 'cache'}", *extra]  # fmt: skip


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


# --- finished runs are immutable to failed or refused commands -------------------------------------------------------


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    manifest = generate_dataset(root / "data", n_images=24, size=48, seed=1, hair=0.0, ruler=0.0)
    args = ["--manifest", str(manifest), "--device", "cpu", "--epochs", "1", "--set", f"run.cache_dir={root / 'c'}",
            *TINY_UNET]  # fmt: skip
    assert train_script.main([*args, "--out", str(root / "run")]) == 0
    return root, args


def test_refused_training_commands_leave_the_run_byte_identical(seg_run, stages, capsys):
    root, args = seg_run
    run = root / "run"
    before = snapshot(run)
    # --resume with other settings; weights that cannot be loaded; another stage's folder
    assert train_script.main([*args, "--out", str(run), "--resume", "--set", "train.lr=0.5"]) == 2
    assert "other settings" in _one_error_line(capsys)
    assert train_script.main([*args, "--out", str(run), "--resume", "--set", "model.decoder_channels=[8,8,8,8,8]"]) == 2
    _one_error_line(capsys)
    assert snapshot(run) == before  # config.yaml, train.log, checkpoints and metrics untouched
    cls_run = stages / "cls" / BACKBONES[0]
    cls_before = snapshot(cls_run)
    assert train_script.main([*args, "--out", str(cls_run)]) == 2
    assert "is a classification run, not a segmentation run" in _one_error_line(capsys)
    assert segment_script.main(["--input", str(root), "--run", str(cls_run), "--out", str(root / "x")]) == 2
    assert "is a classification run, not a segmentation run" in _one_error_line(capsys)
    assert snapshot(cls_run) == cls_before and not (root / "x").exists()


def test_prediction_takes_training_settings_from_the_checkpoint_and_refuses_a_config_that_disagrees(
    seg_run, tmp_path, capsys
):
    root, _ = seg_run
    run = root / "run"
    meta = read_metadata(run / "best.safetensors")
    assert meta["input_size"] == 32 and meta["preprocess"]["colour_constancy"] is False
    photos = tmp_path / "photos"
    _photos(photos, ["a.jpg"])
    out = tmp_path / "crops"
    base = ["--input", str(photos), "--run", str(run), "--out", str(out), "--device", "cpu"]
    assert segment_script.main([*base, "--set", "data.preprocess.colour_constancy=true"]) == 2
    line = _one_error_line(capsys)
    assert "data.preprocess" in line and "'colour_constancy': False" in line and "'colour_constancy': True" in line
    assert segment_script.main([*base, "--set", "data.image_size=64"]) == 2
    assert "data.image_size=32" in _one_error_line(capsys)
    assert not out.exists()
    assert segment_script.main(base) == 0
    info = (out / "crops.json").read_text()
    assert '"crop_size": 299' in info and '"segmentation_weights"' in info  # the crops record what made them


def test_backbones_trained_on_crops_made_differently_are_refused(stages, tmp_path, capsys):
    from dermpipe.classification.backbones import build_classifier, checkpoint_metadata
    from dermpipe.engine.checkpoint import save_checkpoint

    pipeline = write_untrained_pipeline(tmp_path / "p", ["test_resnet", "test_efficientnet"], CLASSES)
    for name, size in (("test_resnet", 40), ("test_efficientnet", 48)):
        model = build_classifier(name, len(CLASSES), False)
        model.input_size = 32
        crops = {"crop_size": size, "margin": 0.1, "threshold": 0.5, "min_area": 0.005, "tta": False}
        meta = checkpoint_metadata(model, CLASSES, crops={**crops, "tta_rotations": False})
        save_checkpoint(pipeline / "cls" / name / "best.safetensors", model, meta)
    photos = tmp_path / "photos"
    _photos(photos, ["a.jpg"])
    assert predict_script.main(_predict(pipeline, photos, tmp_path / "out")) == 2
    assert "crop_size=40" in _one_error_line(capsys)


# --- output paths, collisions, order ------------------------------------------------------------------------------


def test_bad_output_paths_are_refused_before_any_work(stages, tmp_path, capsys):
    photos = tmp_path / "photos"
    _photos(photos, ["a.jpg"])
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = {
        "is a file, not a folder": ["--out", str(a_file)],
        "which is a file": ["--out", str(a_file / "sub")],
        "is a folder": ["--out", str(tmp_path / "o1"), "--output", str(photos)],
        "inside the input folder": ["--out", str(photos / "results")],
    }
    for expected, override in cases.items():
        args = _predict(stages, photos, tmp_path / "o0")
        args[args.index("--out") : args.index("--out") + 2] = override[:2]
        args += override[2:]
        assert predict_script.main(args) == 2, expected
        assert expected in _one_error_line(capsys)
    assert sorted(p.name for p in photos.iterdir()) == ["a.jpg"] and a_file.read_text() == "x"
    assert not (tmp_path / "o0").exists() and not (tmp_path / "o1").exists()


def test_clashing_names_never_share_an_output_file(stages, tmp_path):
    photos = tmp_path / "photos"
    _photos(photos, ["a/x.jpg", "b/x.jpg", "c.jpg"])
    out = tmp_path / "out"
    assert predict_script.main(_predict(stages, photos, out, "--masks", "--crops", "--isic-csv")) == 0
    ids = ["a/x", "b/x", "c"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == sorted(
        f"{output_stem(i)}_segmentation.png" for i in ids
    )
    assert sorted(p.name for p in (out / "crops").iterdir()) == sorted(f"{output_stem(i)}.png" for i in ids)
    with open(out / "isic_submission.csv", newline="") as f:
        assert [r["image"] for r in csv.DictReader(f)] == ids
    assert output_stem("ISIC_0000001") == "ISIC_0000001" and output_stem("a/x") != output_stem("a_x")


def test_rows_keep_input_order_when_a_cache_entry_is_recomputed(stages, tmp_path):
    photos = tmp_path / "photos"
    _photos(photos, [f"p{i}.jpg" for i in range(5)])
    out = tmp_path / "out"
    assert predict_script.main(_predict(stages, photos, out)) == 0
    first = (out / "predictions.csv").read_bytes()
    entries = sorted((tmp_path / "cache" / "crops").rglob("*.npz"))
    entries[len(entries) // 2].write_bytes(b"corrupt")  # one image's crop entry damaged: recomputed, mid-list
    assert predict_script.main(_predict(stages, photos, out)) == 0
    assert (out / "predictions.csv").read_bytes() == first


# --- full disks and killed runs ----------------------------------------------------------------------------------


def test_a_full_disk_is_one_line_and_leaves_finished_outputs_whole(stages, tmp_path, monkeypatch, capsys):
    photos = tmp_path / "photos"
    _photos(photos, ["a.jpg", "b.jpg"])
    out = tmp_path / "out"
    assert predict_script.main(_predict(stages, photos, out)) == 0
    before = snapshot(out)
    _photos(photos, ["c.jpg"])
    real = os.replace

    def full(src, dst):
        if str(dst).endswith("predictions.csv"):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", full)
    assert predict_script.main(_predict(stages, photos, out, "--no-report")) == 2
    assert "No space left on device" in _one_error_line(capsys)
    monkeypatch.undo()
    after = snapshot(out)
    assert after["predictions.csv"] == before["predictions.csv"]  # the finished table, whole
    assert not [p for p in out.rglob(".*tmp*")]  # no temporary left behind


def test_stale_temporaries_of_a_killed_run_are_removed_by_the_next(stages, tmp_path):
    photos = tmp_path / "photos"
    _photos(photos, ["a.jpg"])
    out = tmp_path / "out"
    out.mkdir()
    dead = 2**22 + 12345  # above the usual pid range: no such process
    stale = [out / f".predictions.{dead}.tmp.csv", out / "report_files" / f".a_image.{dead}.tmp.jpg"]
    stale[1].parent.mkdir()
    for path in stale:
        path.write_text("half")
    live = out / f".other.{os.getpid()}.tmp.csv"
    live.write_text("being written")
    assert remove_stale_temporaries(out) == 2 and live.exists()
    live.unlink()
    for path in stale:
        path.write_text("half")
    (out / "report.html").write_text("a report of an earlier run")
    assert predict_script.main(_predict(stages, photos, out)) == 0
    assert not any(path.exists() for path in stale)
    assert "a report of an earlier run" not in (out / "report.html").read_text()


def test_images_the_models_cannot_judge_are_flagged_and_referred(stages, tmp_path):
    photos = tmp_path / "photos"
    _photos(photos, ["fine.jpg"])
    cv2.imwrite(str(photos / "tiny.png"), np.full((10, 10, 3), 128, np.uint8))
    rng = np.random.default_rng(0)
    dark, _ = make_sample(rng, "mel", 96)
    cv2.imwrite(str(photos / "dark16.png"), (dark.astype(np.uint16) * 16)[..., ::-1])  # 12-bit data in 16 bits
    out = tmp_path / "out"
    assert predict_script.main(_predict(stages, photos, out)) == 0
    with open(out / "predictions.csv", newline="") as f:
        rows = {r["image_id"]: r for r in csv.DictReader(f)}
    assert rows["tiny"]["quality"].startswith("too small: 10x10 px") and rows["tiny"]["refer"] == "1"
    assert "under-exposed" in rows["dark16"]["quality"] and rows["dark16"]["refer"] == "1"
    assert "too small" not in rows["fine"]["quality"] and "exposed" not in rows["fine"]["quality"]
    report = (out / "report.html").read_text()
    assert "too small: 10x10 px" in report
