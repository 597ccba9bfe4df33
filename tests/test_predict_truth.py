"""Batch prediction scored against the truth a manifest gives (labels, lesion masks), and a report that opens on what
needs a human: the images to refer, then the wrong ones, then the rest."""

import csv
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import write_untrained_pipeline
from sklearn.metrics import balanced_accuracy_score, confusion_matrix

from dermpipe.configs.schema import RunConfig
from dermpipe.data.generator import generate_dataset
from dermpipe.data.manifest import Manifest
from dermpipe.engine.files import output_stem
from dermpipe.predict import cli as predict_script
from dermpipe.predict.batch import predict_folder
from dermpipe.predict.config import PredictConfig, PredictOutputs
from dermpipe.predict.predictor import EnsemblePredictor
from dermpipe.predict.report import ReportRow, ReviewSelection, review_order, review_rank
from dermpipe.predict.rows import prediction_columns
from dermpipe.segmentation.metrics import METRICS, image_scores, read_mask

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["nv", "mel", "bcc"]
BACKBONES = ["test_resnet", "test_efficientnet"]
TRUTH_OUTPUTS = ("metrics.json", "confusion.csv", "confusion.png", "segmentation_scores.csv")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Untrained stages and a labelled synthetic data set with exact masks."""
    root = tmp_path_factory.mktemp("truth")
    stages = write_untrained_pipeline(root / "stages", BACKBONES, CLASSES)
    data = generate_dataset(root / "syn", n_images=24, size=64, seed=0, classes=CLASSES, imbalance=1.5)
    return root, stages, data


def _stage_args(stages, out, cache):
    return ["--out", str(out), "--device", "cpu", "--segmentation-run", str(stages / "seg"),
            "--classification-root", str(stages / "cls"), "--ensemble-run", str(stages / "ens"),
            "--set", f"run.cache_dir={cache}"]  # fmt: skip


def _read(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _report_order(path):
    """(image ids, data-correct values) of the report's rows, top to bottom."""
    tags = re.findall(r"<tr\b[^>]*\bdata-id=[^>]*>", Path(path).read_text())
    attributes = [dict(re.findall(r'([\w-]+)="([^"]*)"', tag)) for tag in tags]
    return [a["data-id"] for a in attributes], [a.get("data-correct") for a in attributes]


def _expected_order(rows):
    """The CSV's rows as the report should list them: referred, then wrong, then the rest, each in input order."""

    def rank(r):
        return review_rank(r["refer"] == "1", None if r["correct"] == "" else r["correct"] == "1")

    return [r["image_id"] for r in sorted(rows, key=rank)]


@pytest.fixture(scope="module")
def labelled(world):
    """The whole labelled manifest predicted through the script, predicted masks written."""
    root, stages, data = world
    out = root / "labelled"
    assert predict_script.main(["--manifest", str(data), "--masks", *_stage_args(stages, out, root / "cache")]) == 0
    return out, Manifest.read(data), stages


def test_labelled_manifest_fills_truth_correct_and_model(labelled):
    out, manifest, stages = labelled
    rows = _read(out / "predictions.csv")
    assert list(rows[0]) == prediction_columns(CLASSES)
    assert list(rows[0])[-3:] == ["truth", "correct", "model"]
    assert [r["image_id"] for r in rows] == [r["image_id"] for r in manifest.rows]  # input order
    for row, entry in zip(rows, manifest.rows):
        assert row["truth"] == entry["label"] != ""
        assert row["correct"] == str(int(row["predicted"] == row["truth"]))
        assert row["model"].startswith(f"{stages / 'ens'} [unet:")  # the run folder and each stage's digest
    report = (out / "report.html").read_text()
    assert f"<td>model</td><td>{stages / 'ens'} [unet:" in report  # the report names the model first


def test_metrics_agree_with_sklearn_on_the_csv(labelled):
    out, manifest, _ = labelled
    rows = _read(out / "predictions.csv")
    metrics = json.loads((out / "metrics.json").read_text())
    truth, predicted = [r["truth"] for r in rows], [r["predicted"] for r in rows]
    assert metrics["scored"] == metrics["labelled"] == metrics["images"] == len(rows) == len(manifest)
    assert metrics["labels_outside_classes"] == {}
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, predicted))
    assert metrics["accuracy"] == pytest.approx(np.mean([t == p for t, p in zip(truth, predicted)]))
    assert set(metrics["recall"]) == set(CLASSES) and 0.0 <= metrics["macro_auc"] <= 1.0
    expected = confusion_matrix(truth, predicted, labels=CLASSES)
    assert metrics["confusion_matrix"] == expected.tolist()
    table = _read(out / "confusion.csv")
    matrix = [[int(r[c]) for c in CLASSES] for r in table]
    assert [r["true\\predicted"] for r in table] == CLASSES and matrix == expected.tolist()
    assert sum(map(sum, matrix)) == metrics["scored"]
    assert (out / "confusion.png").stat().st_size > 0
    # mel (the vote's refer_class): a referred image is sent to a dermatologist, so caught, or a false alarm
    refer = metrics["refer"]
    sent = {r["image_id"]: r["predicted"] == "mel" or r["refer"] == "1" for r in rows}
    positives = [r["image_id"] for r in rows if r["truth"] == "mel"]
    negatives = [r["image_id"] for r in rows if r["truth"] != "mel"]
    assert refer["class"] == "mel" and refer["threshold"] == 0.5
    assert (refer["positives"], refer["negatives"]) == (len(positives), len(negatives))
    assert refer["referred"] == sum(r["refer"] == "1" for r in rows)
    assert refer["sensitivity"] == pytest.approx(np.mean([sent[i] for i in positives]))
    assert refer["specificity"] == pytest.approx(np.mean([not sent[i] for i in negatives]))


def test_masks_scored_against_the_written_predicted_masks(labelled):
    out, manifest, _ = labelled
    scores = _read(out / "segmentation_scores.csv")
    assert list(scores[0]) == ["image_id", *METRICS, "missing"]
    assert [r["image_id"] for r in scores] == [r["image_id"] for r in manifest.rows]
    for row, entry in zip(scores, manifest.rows):
        predicted = read_mask(out / "masks" / f"{output_stem(entry['image_id'])}_segmentation.png")
        expected = image_scores(predicted > 128, read_mask(Path(entry["mask_path"])) > 128)
        assert row["missing"] == ""
        assert {m: float(row[m]) for m in METRICS} == pytest.approx(expected, abs=1e-6)
    segmentation = json.loads((out / "metrics.json").read_text())["segmentation"]
    assert segmentation["scored"] == len(scores) and segmentation["missing"] == 0
    for m in METRICS:
        assert segmentation[m] == pytest.approx(np.mean([float(r[m]) for r in scores]), abs=1e-6)


def test_report_opens_on_referred_then_wrong(labelled):
    out, _, _ = labelled
    rows = _read(out / "predictions.csv")
    ids, _ = _report_order(out / "report.html")
    assert ids == _expected_order(rows)
    report = (out / "report.html").read_text()
    assert "&#10007; wrong" in report and "<th onclick=\"sortBy('truth',false)\">truth</th>" in report


def _config(world, out, **outputs):
    root, stages, _ = world
    return PredictConfig(
        segmentation_run=str(stages / "seg"),
        classification_root=str(stages / "cls"),
        ensemble_run=str(stages / "ens"),
        outputs=PredictOutputs(**outputs),
        run=RunConfig(out_dir=str(out), cache_dir=str(root / "cache")),
    )


def test_every_group_in_review_order_and_a_capped_report_keeps_its_top(world, tmp_path):
    """A refer threshold at the median confidence: some referred, some wrong and kept, some right and kept."""
    _, _, data = world
    manifest = Manifest.read(data)
    predictor = EnsemblePredictor(_config(world, tmp_path / "a"), torch.device("cpu"))
    probe = predict_folder(manifest, predictor, tmp_path / "probe" / "predictions.csv", tmp_path / "probe")
    confidences = sorted(float(r["confidence"]) for r in _read(tmp_path / "probe" / "predictions.csv"))
    predictor.refer_threshold = (confidences[len(confidences) // 2 - 1] + confidences[len(confidences) // 2]) / 2
    summary = predict_folder(manifest, predictor, tmp_path / "a" / "predictions.csv", tmp_path / "a", model_id="m@x")
    rows = _read(tmp_path / "a" / "predictions.csv")
    groups = {review_rank(r["refer"] == "1", r["correct"] == "1") for r in rows}
    assert groups == {0, 1, 2}, "the data should give every group"
    ids, correct = _report_order(tmp_path / "a" / "report.html")
    assert ids == _expected_order(rows) and ids != [r["image_id"] for r in rows]
    assert correct == [r["correct"] for r in sorted(rows, key=lambda r: ids.index(r["image_id"]))]
    assert summary.model == "m@x" and {r["model"] for r in rows} == {"m@x"}
    assert summary.scored == len(rows) and probe.scored == len(rows)
    assert summary.balanced_accuracy == pytest.approx(balanced_accuracy_score(
        [r["truth"] for r in rows], [r["predicted"] for r in rows]))  # fmt: skip
    assert summary.masks_scored == len(rows) and 0.0 <= summary.mask_jaccard <= 1.0
    report = (tmp_path / "a" / "report.html").read_text()
    assert f"<td>balanced accuracy</td><td>{summary.balanced_accuracy:.4f}</td>" in report

    # a report capped at 5 images shows the first 5 of that order; the pictures of the others are not left behind
    predictor.cfg = replace(predictor.cfg, outputs=PredictOutputs(report_max_images=5))
    predict_folder(manifest, predictor, tmp_path / "b" / "predictions.csv", tmp_path / "b")
    capped, _ = _report_order(tmp_path / "b" / "report.html")
    assert capped == ids[:5]
    pictures = {p.name.rsplit("_", 1)[0] for p in (tmp_path / "b" / "report_files").iterdir()}
    assert pictures == {output_stem(i) for i in capped}
    report = (tmp_path / "b" / "report.html").read_text()
    assert "<td>shown in this report</td><td>5 " in report
    assert f"<td>mel</td><td>{sum(r['predicted'] == 'mel' for r in rows)}</td>" in report  # counts over all images


def _row(i, refer, correct):
    return ReportRow(f"img{i}", {"nv": 1.0}, "nv", 1.0, refer, "", correct=correct)


def test_review_selection_keeps_the_first_of_review_order():
    rng = np.random.default_rng(0)
    kinds = [(True, None), (True, False), (False, False), (False, True), (False, None)]
    rows = [_row(i, *kinds[k]) for i, k in enumerate(rng.integers(0, len(kinds), 40))]
    assert [review_rank(r.refer, r.correct) for r in review_order(rows)] == sorted(
        review_rank(r.refer, r.correct) for r in rows
    )
    for limit in (0, 1, 4, 17, 40, 100):
        selection, made, evicted = ReviewSelection(limit), [], []
        for row in rows:
            if selection.wants(review_rank(row.refer, row.correct)):
                made.append(row)
                if (pushed := selection.add(row)) is not None:
                    evicted.append(pushed)
        assert selection.rows == review_order(rows)[:limit]
        assert sorted(r.image_id for r in made) == sorted(r.image_id for r in [*selection.rows, *evicted])


def test_unreadable_masks_and_foreign_labels_are_reported_not_fatal(world, tmp_path, caplog):
    _, _, data = world
    source = Manifest.read(data)
    rows = [dict(r) for r in source.rows[:8]]
    height, width = read_mask(Path(rows[0]["mask_path"])).shape
    masks = tmp_path / "masks"
    masks.mkdir()
    cv2.imwrite(str(masks / "empty.png"), np.zeros((height, width), np.uint8))
    cv2.imwrite(str(masks / "small.png"), np.zeros((height // 2, width // 2), np.uint8))
    (masks / "corrupt.png").write_text("not a png")
    rows[0]["mask_path"] = str(masks / "empty.png")  # no lesion at all: any predicted lesion pixel scores 0
    rows[1]["mask_path"] = str(masks / "corrupt.png")
    rows[2]["mask_path"] = str(masks / "small.png")
    rows[3]["mask_path"] = str(masks / "nowhere.png")
    rows[4]["label"] = "akiec"  # a class the model was not trained on
    rows[5]["label"] = ""  # unlabelled
    rows[6]["mask_path"] = ""  # no true mask
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    rows.append({**rows[7], "image_id": "broken", "image_path": str(broken)})
    manifest = Manifest(rows=tuple(rows), classes=(*CLASSES, "akiec"))
    out = tmp_path / "out"
    out.mkdir()
    predictor = EnsemblePredictor(_config(world, out, masks=True), torch.device("cpu"))
    summary = predict_folder(manifest, predictor, out / "predictions.csv", out)

    table = _read(out / "predictions.csv")
    assert [r["image_id"] for r in table] == [r["image_id"] for r in rows[:8]]  # every readable image predicted
    assert [r["truth"] for r in table] == [r["label"] for r in rows[:8]]
    assert table[4]["correct"] == "0" and table[5]["correct"] == ""
    assert [r["image_id"] for r in _read(out / "skipped.csv")] == ["broken"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["labels_outside_classes"] == {"akiec": 1}
    assert (metrics["images"], metrics["labelled"], metrics["scored"]) == (8, 7, 6) == (8, 7, summary.scored)
    assert sum(map(sum, metrics["confusion_matrix"])) == 6
    assert "akiec" in caplog.text and "cannot name" in caplog.text

    scores = {r["image_id"]: r for r in _read(out / "segmentation_scores.csv")}
    assert sorted(scores) == sorted(r["image_id"] for i, r in enumerate(rows[:8]) if i != 6)
    assert "cannot read mask" in scores[rows[1]["image_id"]]["missing"]
    size = f"{width // 2}x{height // 2} (WxH) but the image is {width}x{height}"
    assert size in scores[rows[2]["image_id"]]["missing"]
    assert "not found" in scores[rows[3]["image_id"]]["missing"]
    assert all(scores[rows[i]["image_id"]]["jaccard"] == "" for i in (1, 2, 3))
    empty = scores[rows[0]["image_id"]]
    predicted = read_mask(out / "masks" / f"{output_stem(rows[0]['image_id'])}_segmentation.png") > 128
    assert float(empty["jaccard"]) == (0.0 if predicted.any() else 1.0) and empty["missing"] == ""
    assert float(empty["jaccard"]) == image_scores(predicted, np.zeros_like(predicted))["jaccard"]
    assert metrics["segmentation"]["scored"] == 4 and metrics["segmentation"]["missing"] == 3
    assert "3 of 7 true masks not scored" in caplog.text


def test_unlabelled_folder_has_empty_truth_columns_and_no_metrics(world, tmp_path):
    root, stages, data = world
    folder = tmp_path / "photos"
    folder.mkdir()
    for entry in Manifest.read(data).rows[:4]:
        shutil.copy(entry["image_path"], folder)
    out = tmp_path / "out"
    out.mkdir()
    for name in TRUTH_OUTPUTS:  # an earlier labelled run's scores must not pass for this one's
        (out / name).write_text("stale")
    assert predict_script.main(["--input", str(folder), *_stage_args(stages, out, root / "cache")]) == 0
    rows = _read(out / "predictions.csv")
    assert len(rows) == 4 and list(rows[0]) == prediction_columns(CLASSES)
    assert all(r["truth"] == r["correct"] == "" and r["model"].startswith(f"{stages / 'ens'} [") for r in rows)
    assert not any((out / name).exists() for name in TRUTH_OUTPUTS)
    report = (out / "report.html").read_text()
    assert "data-correct" not in report and "sortBy('truth'" not in report and "balanced accuracy" not in report
