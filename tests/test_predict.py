"""Batch prediction over a folder: bad files skipped and reported, cache reuse on rerun, identical predictions."""

import csv
import io

import cv2
import numpy as np
import pytest
from conftest import write_untrained_pipeline

from dermpipe.data.generator import make_sample
from dermpipe.predict import cli as predict_script

CLASSES = ["nv", "mel", "bcc"]
BACKBONES = ["test_resnet", "test_efficientnet"]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Untrained but complete stage folders: what the predictor loads is exercised, not what the models learned."""
    return write_untrained_pipeline(tmp_path_factory.mktemp("stages"), BACKBONES, CLASSES)


def _photos(folder, n=4, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        image, _ = make_sample(rng, CLASSES[i % 3], 64)
        cv2.imwrite(str(folder / f"photo_{i}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return rng


def _args(stages, folder, out):
    return ["--input", str(folder), "--output", str(out / "predictions.csv"), "--out", str(out), "--device", "cpu",
            "--segmentation-run", str(stages / "seg"), "--classification-root", str(stages / "cls"),
            "--ensemble-run", str(stages / "ens"), "--set", f"run.cache_dir={out.parent / 'cache'}"]  # fmt: skip


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_folder_with_bad_files_completes_and_reports(stages, tmp_path, capsys):
    folder = tmp_path / "photos"
    rng = _photos(folder)
    sub = folder / "clinic_b"
    sub.mkdir()
    image, _ = make_sample(rng, "mel", 64)
    cv2.imwrite(str(sub / "gray.png"), cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))
    cv2.imwrite(str(sub / "rgba.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGRA))
    good = cv2.imencode(".jpg", image)[1].tobytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (folder / "notes.png").write_text("not an image at all")
    out = tmp_path / "out"
    assert predict_script.main(_args(stages, folder, out)) == 0
    rows = _read(out / "predictions.csv")
    assert [r["image_id"] for r in rows] == ["clinic_b/gray", "clinic_b/rgba", *[f"photo_{i}" for i in range(4)]]
    columns = ["image_id", "path", *CLASSES, "predicted", "confidence", "refer", "box", "fallback", "quality"]
    assert list(rows[0]) == [*columns, "truth", "correct", "model"]  # truth columns empty: a folder has no labels
    assert all(r["truth"] == r["correct"] == "" and r["model"].startswith(f"{stages / 'ens'} [") for r in rows)
    for r in rows:
        probs = [float(r[c]) for c in CLASSES]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert r["predicted"] == CLASSES[int(np.argmax(probs))] and float(r["confidence"]) == max(probs)
        assert r["refer"] == str(int(max(probs) < 0.5 or bool(r["quality"])))  # unsure, or not judgeable
        assert len(r["box"].split()) == 4
    skipped = {r["image_id"]: r["reason"] for r in _read(out / "skipped.csv")}
    assert set(skipped) == {"truncated", "notes"}
    assert "truncated.jpg" in skipped["truncated"] and "notes.png" in skipped["notes"]
    report = (out / "report.html").read_text()
    assert "clinic_b/rgba" in report and "notes.png" in report and report.count("<tr data-id=") == 6
    assert "6 images" in capsys.readouterr().out


def test_rerun_reuses_cache_and_adding_images_computes_only_them(stages, tmp_path, capsys):
    folder = tmp_path / "photos"
    _photos(folder, n=5)
    out = tmp_path / "out"
    assert predict_script.main(_args(stages, folder, out)) == 0
    first = (out / "predictions.csv").read_text()
    assert "0 reused, 15 computed" in capsys.readouterr().out  # 5 crops + 5 x 2 backbones
    assert predict_script.main(_args(stages, folder, out)) == 0
    assert "15 reused, 0 computed" in capsys.readouterr().out
    assert (out / "predictions.csv").read_text() == first  # identical predictions across runs
    rng = np.random.default_rng(99)
    image, _ = make_sample(rng, "bcc", 64)
    cv2.imwrite(str(folder / "new.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert predict_script.main(_args(stages, folder, out)) == 0
    assert "15 reused, 3 computed" in capsys.readouterr().out
    before = {r["image_id"]: r for r in csv.DictReader(io.StringIO(first))}
    rows = {r["image_id"]: r for r in _read(out / "predictions.csv")}
    assert sorted(rows) == sorted([*before, "new"])
    assert all(rows[image_id] == row for image_id, row in before.items())  # the five earlier rows, unchanged
    assert rows["new"]["predicted"] in rows["new"] and float(rows["new"]["confidence"]) > 0


def test_missing_stage_is_one_clear_error(stages, tmp_path, capsys):
    folder = tmp_path / "photos"
    _photos(folder, n=1)
    args = _args(stages, folder, tmp_path / "out")
    args[args.index("--classification-root") + 1] = str(tmp_path / "nowhere")
    assert predict_script.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "classification/train.py --backbone test_resnet" in err


def test_the_report_shows_the_photo_as_decoded_for_cropping_never_decoding_it_again(stages, tmp_path, monkeypatch):
    from dermpipe.data import reading
    from dermpipe.engine.cache import StageCache

    folder = tmp_path / "photos"
    _photos(folder, n=3)
    decoded = []
    decode = reading._decode  # every pixel decode goes through it
    monkeypatch.setattr(reading, "_decode", lambda path, *a: decoded.append(str(path)) or decode(path, *a))
    out = tmp_path / "out"
    assert predict_script.main(_args(stages, folder, out)) == 0
    assert sorted(decoded) == sorted(str(p) for p in folder.glob("*.jpg"))  # once each: crop and report alike
    pictures = {p.name: p.read_bytes() for p in (out / "report_files").iterdir()}
    report = (out / "report.html").read_bytes()
    assert len(pictures) == 6  # the photo with its contour and the crop, for each of three
    decoded.clear()
    assert predict_script.main(_args(stages, folder, out)) == 0
    assert decoded == []  # every crop and thumbnail from the cache
    assert (out / "report.html").read_bytes() == report
    # an entry made before the thumbnail was kept with the crop: the report decodes the photo again, as the crop was
    cache = StageCache(tmp_path / "cache", "crops")
    for entry in (tmp_path / "cache" / "crops").rglob("*.npz"):
        with np.load(entry) as npz:
            key = str(npz["__key__"])
        arrays, meta = cache.get(key)
        cache.put(key, {k: v for k, v in arrays.items() if k != "thumbnail"}, meta)
    assert predict_script.main(_args(stages, folder, out)) == 0
    assert len(decoded) == 3
    assert {p.name: p.read_bytes() for p in (out / "report_files").iterdir()} == pictures
