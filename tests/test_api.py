"""The Python API (``dermpipe.load``): the docs' snippet run as written against a demo bundle, and every record
checked against what ``dermpipe predict`` writes for the same photos."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dermpipe
from dermpipe.bundle.store import BundleError
from dermpipe.data.reading import read_image, read_mask
from dermpipe.errors import DermpipeError
from dermpipe.pipeline import demo
from dermpipe.predict.api import UnreadableImageError
from dermpipe.segmentation.prediction import Skipped

pytestmark = pytest.mark.e2e  # whole pipelines trained: left out of `make test-fast`

REPO = Path(__file__).resolve().parents[1]
DERMPIPE = Path(sys.executable).parent / "dermpipe"
BACKBONES = "test_resnet,test_efficientnet"


def api_snippet() -> str:
    """The first Python block of the docs' Python API page."""
    text = (REPO / "docs" / "python-api.md").read_text(encoding="utf-8")
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small demo (two tiny classifiers, one epoch each) and its bundle; its photos (one is not a photo), and what
    ``dermpipe predict --model`` writes for them."""
    tmp = tmp_path_factory.mktemp("api")
    code = demo.main(["--out", str(tmp / "demo"), "--images", "48", "--seg-epochs", "1", "--cls-epochs", "1",
                      "--backbones", BACKBONES])  # fmt: skip
    assert code == 0
    bundle, photos = tmp / "demo" / "bundle", tmp / "demo" / "photos"
    cli = subprocess.run([str(DERMPIPE), "predict", "--model", str(bundle), "--input", str(photos), "--out",
                          str(tmp / "cli"), "--masks"], capture_output=True, text=True)  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    with open(tmp / "cli" / "predictions.csv", newline="") as f:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    return {"tmp": tmp, "bundle": bundle, "photos": photos, "rows": rows, "model": dermpipe.load(bundle)}


def test_the_docs_snippet_runs_as_written_and_writes_what_the_cli_writes(world, tmp_path):
    """The page's block, verbatim, as a notebook runs it: in a folder holding ``ham-v1`` (the demo bundle), two
    photos and a ``photos/`` folder; its ``predict_folder`` output is the command's, byte for byte."""
    shutil.copytree(world["bundle"], tmp_path / "ham-v1")
    shutil.copytree(world["photos"], tmp_path / "photos")
    shutil.copyfile(world["photos"] / "photo_000.jpg", tmp_path / "a.jpg")
    Image.open(world["photos"] / "photo_001.jpg").save(tmp_path / "b.png")
    snippet = api_snippet()
    assert 'dermpipe.load("ham-v1")' in snippet and "predict_folder" in snippet
    script = snippet + "\nprint(rows[0].predicted, rows[1].predicted, len(rows))\n"
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    predicted = run.stdout.split()
    assert predicted[:2] == [world["rows"]["photo_000.jpg"]["predicted"], world["rows"]["photo_001.jpg"]["predicted"]]
    assert predicted[2] == "2"
    cli, api = world["tmp"] / "cli", tmp_path / "pred"
    for name in ("predictions.csv", "skipped.csv", "report.html"):  # the photos were copied: their folder differs
        left = (cli / name).read_text(encoding="utf-8").replace(str(world["photos"].resolve()), "PHOTOS")
        right = (api / name).read_text(encoding="utf-8").replace(str((tmp_path / "photos").resolve()), "PHOTOS")
        assert "PHOTOS" in left or name == "report.html"
        assert left == right, name


def test_predict_gives_the_rows_the_cli_writes_for_paths_arrays_and_pil_images(world):
    model, photos, rows = world["model"], world["photos"], world["rows"]
    names = ["photo_002.jpg", "photo_003.jpg", "photo_004.jpg"]
    pixels = [read_image(photos / n) for n in names]  # the reader's own pixels: an array is the same photo
    inputs = [photos / names[0], pixels[1], Image.fromarray(pixels[2])]
    got = model.predict(inputs)
    assert [type(r).__name__ for r in got] == ["Prediction"] * 3
    for record, name in zip(got, names):
        row = rows[name]
        assert record.model == row["model"] == model.model_id and record.model.startswith("bundle@sha256:")
        assert list(record.probabilities) == model.classes
        for c, p in record.probabilities.items():
            assert p == pytest.approx(float(row[c]), abs=2e-6)
        assert record.predicted == row["predicted"] and record.refer == (row["refer"] == "1")
        assert record.box.as_text() == row["box"] and record.box.fallback == row["fallback"]
        assert "; ".join(record.quality) == row["quality"]
        assert record.refer == bool(record.refer_reason)
    assert got[0].image_id == "photo_002" and got[0].path == str(photos / names[0])
    assert (got[1].image_id, got[1].path) == ("image-1", "")
    one = model.predict(photos / names[0])  # one image is a batch of one
    assert len(one) == 1 and one[0].probabilities == got[0].probabilities


def test_an_unreadable_image_is_named_or_skipped_in_place(world):
    model, photos = world["model"], world["photos"]
    with pytest.raises(UnreadableImageError, match=r"notes\.jpg: .*skip_unreadable=True"):
        model.predict([photos / "photo_000.jpg", photos / "notes.jpg"])
    got = model.predict([photos / "notes.jpg", photos / "photo_000.jpg"], skip_unreadable=True)
    assert isinstance(got[0], Skipped) and got[0].path == str(photos / "notes.jpg") and got[0].reason
    assert got[1].predicted == world["rows"]["photo_000.jpg"]["predicted"]
    with pytest.raises(DermpipeError, match="dtype float64"):
        model.predict(np.zeros((32, 32, 3)))


def test_segment_gives_the_mask_batch_prediction_writes(world):
    model, photos = world["model"], world["photos"]
    seg = model.segment(photos / "photo_005.jpg")
    written = read_mask(world["tmp"] / "cli" / "masks" / "photo_005_segmentation.png")
    assert seg.mask.shape == written.shape == read_image(photos / "photo_005.jpg").shape[:2]
    assert np.array_equal(seg.mask.astype(bool), written.astype(bool))
    assert seg.box.as_text() == world["rows"]["photo_005.jpg"]["box"]
    assert seg.crop.ndim == 3 and seg.crop.dtype == np.uint8


def test_explain_maps_the_predicted_class_over_the_crop(world):
    model, photos = world["model"], world["photos"]
    explained = model.explain(photos / "photo_006.jpg")
    assert explained.target == explained.prediction.predicted == world["rows"]["photo_006.jpg"]["predicted"]
    assert explained.backbone == model.backbones[0]
    assert explained.overlay.shape == explained.crop.shape and explained.overlay.dtype == np.uint8
    assert not np.array_equal(explained.overlay, explained.crop)  # the class map is drawn over it
    assert model.explain(photos / "photo_006.jpg", backbone=model.backbones[1]).backbone == model.backbones[1]
    with pytest.raises(DermpipeError, match="not in this model"):
        model.explain(photos / "photo_006.jpg", backbone="resnet50")


def test_to_frame_holds_the_records(world):
    model, photos = world["model"], world["photos"]
    got = model.predict([photos / "photo_007.jpg", photos / "notes.jpg"], skip_unreadable=True)
    frame = dermpipe.to_frame(got)
    assert list(frame["image_id"]) == ["photo_007", "notes"]
    assert frame.loc[0, "predicted"] == got[0].predicted
    assert frame.loc[0, model.classes[0]] == got[0].probabilities[model.classes[0]]
    assert frame.loc[1, "skipped"] == got[1].reason


def test_load_verifies_a_bundle_takes_its_archive_and_refuses_what_is_neither(world, tmp_path):
    copy = shutil.copytree(world["bundle"], tmp_path / "copy")
    archive = shutil.make_archive(str(tmp_path / "ham-v1"), "gztar", tmp_path, "copy")
    assert dermpipe.load(archive).model_id == world["model"].model_id  # the same files: the same identity
    meta = copy / "ensemble" / "meta.safetensors"
    meta.write_bytes(meta.read_bytes() + b" ")
    with pytest.raises(BundleError, match="does not match its sha256"):
        dermpipe.load(copy)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="not a bundle"):
        dermpipe.load(tmp_path / "empty")


def test_load_takes_a_trained_run_root_and_names_its_stage_models(world):
    root = world["tmp"] / "demo"  # the demo's run root: the stages the bundle was made from
    model = dermpipe.load(root, cache_dir=world["tmp"] / "root-cache")
    assert model.model_id.startswith(f"{root / 'ensemble'} [unet:") and " vote:" in model.model_id
    assert model.backbones == world["model"].backbones and "Model(" in repr(model)
    (from_root,) = model.predict(world["photos"] / "photo_008.jpg")
    (from_bundle,) = world["model"].predict(world["photos"] / "photo_008.jpg")
    assert from_root.probabilities == pytest.approx(from_bundle.probabilities, abs=1e-6)
    assert (world["tmp"] / "root-cache").is_dir()  # the cache it was told, not the root's own
