"""ISIC segmentation metrics: hand-computed values, the official edge cases, folder pairing, CLI, official scorer."""

import csv

import cv2
import numpy as np
import pytest

from dermpipe.segmentation.metrics import (
    METRICS,
    MaskScoringError,
    batch_scores_torch,
    binary_mask,
    confusion_counts,
    image_scores,
    mean_scores,
    score_folders,
)
from dermpipe.segmentation.score import main


def _mask(shape, rows, cols, value=255):
    mask = np.zeros(shape, np.uint8)
    mask[rows, cols] = value
    return mask


def _blob(rng, height, width):
    """A random filled ellipse (sometimes none) with a little speckle, as a 0/255 mask."""
    mask = np.zeros((height, width), np.uint8)
    if rng.random() > 0.1:
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(2, width // 2)), int(rng.integers(2, height // 2)))
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 255, thickness=-1)
    mask[rng.random((height, width)) < 0.02] = 255
    return mask


def test_perfect_mask_scores_one_everywhere():
    truth = _mask((16, 16), slice(3, 11), slice(4, 12))
    assert image_scores(truth.copy(), truth) == dict.fromkeys(METRICS, 1.0)


def test_disjoint_mask_scores_zero_overlap():
    truth = _mask((8, 8), slice(0, 4), slice(0, 4))
    pred = _mask((8, 8), slice(4, 8), slice(4, 8))
    scores = image_scores(pred, truth)
    assert scores["jaccard"] == scores["dice"] == scores["sensitivity"] == scores["thresholded_jaccard"] == 0.0
    assert scores["specificity"] == pytest.approx(32 / 48) and scores["accuracy"] == pytest.approx(32 / 64)


def test_hand_computed_four_by_four():
    truth = np.array([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], np.uint8)
    pred = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]], np.uint8)
    assert confusion_counts(pred, truth) == (2, 1, 2, 11)
    scores = image_scores(pred, truth)
    expected = {
        "jaccard": 2 / 5,
        "thresholded_jaccard": 0.0,
        "dice": 4 / 7,
        "sensitivity": 2 / 4,
        "specificity": 11 / 12,
        "accuracy": 13 / 16,
    }
    assert scores == pytest.approx(expected, abs=1e-12)
    # The same masks as 0/255 and as bool give the same counts.
    assert confusion_counts(pred * 255, truth.astype(bool)) == (2, 1, 2, 11)


@pytest.mark.parametrize(("overlap", "kept"), [(6, 0.0), (7, 0.7), (13, 0.65)])
def test_thresholded_jaccard_drops_images_below_065(overlap, kept):
    size = 20 if overlap == 13 else 10
    truth = np.ones((1, size), bool)
    pred = np.arange(size)[None, :] < overlap
    scores = image_scores(pred, truth)
    assert scores["jaccard"] == pytest.approx(overlap / size)
    assert scores["thresholded_jaccard"] == pytest.approx(kept)


def test_grey_threshold_is_above_128_like_the_official_scorer():
    truth = _mask((2, 4), slice(0, 2), slice(0, 4))
    pred = np.array([[255, 129, 128, 0], [255, 255, 255, 255]], np.uint8)
    assert confusion_counts(pred, truth) == (6, 0, 2, 0)
    assert binary_mask(np.array([0, 1, 1], np.int64)).tolist() == [False, True, True]
    assert binary_mask(np.array([0.2, 0.5, 0.9])).tolist() == [False, False, True]
    with pytest.raises(ValueError, match="negative"):
        binary_mask(np.array([-1.0, 2.0]))


def test_empty_masks_follow_the_official_edge_cases():
    empty = np.zeros((4, 5), np.uint8)
    full = np.full((4, 5), 255, np.uint8)
    some = _mask((4, 5), slice(0, 2), slice(0, 2))
    # Nothing to find and nothing found: a perfect answer.
    assert image_scores(empty, empty) == dict.fromkeys(METRICS, 1.0)
    # Nothing to find but 4 pixels claimed: sensitivity is a freebie, the overlap metrics are 0.
    assert image_scores(some, empty) == pytest.approx(
        {"jaccard": 0, "thresholded_jaccard": 0, "dice": 0, "sensitivity": 1, "specificity": 16 / 20, "accuracy": 0.8}
    )
    # A lesion missed entirely.
    assert image_scores(empty, some) == pytest.approx(
        {"jaccard": 0, "thresholded_jaccard": 0, "dice": 0, "sensitivity": 0, "specificity": 1, "accuracy": 0.8}
    )
    # The whole image is lesion: specificity has no negatives and is a freebie.
    assert image_scores(some, full)["specificity"] == 1.0
    assert image_scores(some, full)["sensitivity"] == pytest.approx(4 / 20)


def test_shape_mismatch_and_empty_mean_are_refused():
    with pytest.raises(ValueError, match="shape"):
        confusion_counts(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="no per-image scores"):
        mean_scores([])


def test_mean_scores_average_per_image():
    per_image = [dict.fromkeys(METRICS, 1.0), dict.fromkeys(METRICS, 0.5), dict.fromkeys(METRICS, 0.0)]
    assert mean_scores(per_image) == pytest.approx(dict.fromkeys(METRICS, 0.5))


def test_torch_batch_agrees_with_image_scores():
    import torch

    rng = np.random.default_rng(0)
    truth = np.stack([_blob(rng, 24, 32) > 0 for _ in range(6)])
    truth[0] = False  # empty truth, and below an empty prediction
    logits = torch.from_numpy(np.where(truth, 2.0, -2.0) + rng.normal(0, 2.0, truth.shape)).float()
    logits[0] = -5.0
    logits[1] = 5.0  # everything predicted
    batch = batch_scores_torch(logits[:, None], torch.from_numpy(truth).float()[:, None])
    pred = (torch.sigmoid(logits) > 0.5).numpy()
    for i in range(len(truth)):
        expected = image_scores(pred[i], truth[i])
        for name in METRICS:
            assert batch[name][i].item() == pytest.approx(expected[name], abs=1e-9), (i, name)
    assert batch["jaccard"][0].item() == 1.0
    with pytest.raises(ValueError, match="shape"):
        batch_scores_torch(logits[:, None], torch.from_numpy(truth).float())


@pytest.fixture
def folders(tmp_path):
    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    truth_dir.mkdir()
    pred_dir.mkdir()
    truth_1 = _mask((12, 16), slice(2, 8), slice(2, 10))
    truth_2 = _mask((10, 10), slice(0, 5), slice(0, 10))
    cv2.imwrite(str(truth_dir / "ISIC_0000001_Segmentation.png"), truth_1)
    cv2.imwrite(str(truth_dir / "ISIC_0000002_segmentation.png"), truth_2)
    (truth_dir / "LICENSE.txt").write_text("not a mask")
    cv2.imwrite(str(pred_dir / "ISIC_0000001.png"), truth_1)
    cv2.imwrite(str(pred_dir / "ISIC_0000002_segmentation.png"), _mask((10, 10), slice(0, 5), slice(0, 5)))
    cv2.imwrite(str(pred_dir / "ISIC_0000009_segmentation.png"), truth_2)  # no truth: ignored
    return truth_dir, pred_dir


def test_score_folders_pairs_isic_names(folders):
    per_image, means = score_folders(*folders)
    assert [image_id for image_id, _ in per_image] == ["ISIC_0000001", "ISIC_0000002"]
    assert per_image[0][1] == dict.fromkeys(METRICS, 1.0)
    assert per_image[1][1]["jaccard"] == pytest.approx(0.5) and per_image[1][1]["sensitivity"] == pytest.approx(0.5)
    assert means["jaccard"] == pytest.approx(0.75) and means["thresholded_jaccard"] == pytest.approx(0.5)


def test_score_folders_refuses_missing_wrong_size_and_colour_predictions(folders):
    truth_dir, pred_dir = folders
    (pred_dir / "ISIC_0000002_segmentation.png").unlink()
    with pytest.raises(MaskScoringError, match=r"1 of 2 true masks have no prediction .*ISIC_0000002"):
        score_folders(truth_dir, pred_dir)
    cv2.imwrite(str(pred_dir / "ISIC_0000002_segmentation.png"), np.zeros((10, 12), np.uint8))
    with pytest.raises(MaskScoringError, match=r"ISIC_0000002_segmentation.png is 12x10 .* 10x10"):
        score_folders(truth_dir, pred_dir)
    cv2.imwrite(str(pred_dir / "ISIC_0000002_segmentation.png"), np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(MaskScoringError, match="3 channel.*8-bit greyscale"):
        score_folders(truth_dir, pred_dir)
    cv2.imwrite(str(pred_dir / "ISIC_0000002_mask.png"), np.zeros((10, 10), np.uint8))
    with pytest.raises(MaskScoringError, match="several masks for ISIC_0000002"):
        score_folders(truth_dir, pred_dir)


def test_score_folders_falls_back_to_same_stem(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "p").mkdir()
    truth = _mask((8, 8), slice(0, 4), slice(0, 8))
    cv2.imwrite(str(tmp_path / "t" / "IMD002_lesion.bmp"), truth)
    cv2.imwrite(str(tmp_path / "p" / "IMD002_lesion.png"), _mask((8, 8), slice(0, 4), slice(0, 6)))
    per_image, _ = score_folders(tmp_path / "t", tmp_path / "p")
    assert per_image[0][0] == "IMD002_lesion" and per_image[0][1]["jaccard"] == pytest.approx(0.75)


def test_cli_prints_table_and_writes_csv(folders, tmp_path, capsys):
    out_csv = tmp_path / "scores" / "per_image.csv"
    assert main([str(folders[0]), str(folders[1]), "--csv", str(out_csv)]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = dict(line.split() for line in lines[1 : 2 + len(METRICS)])
    assert float(table["jaccard"]) == pytest.approx(0.75) and float(table["thresholded_jaccard"]) == 0.5
    assert table["images"] == "2"
    with out_csv.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["image_id"] for row in rows] == ["ISIC_0000001", "ISIC_0000002"]
    assert float(rows[1]["dice"]) == pytest.approx(2 / 3)


def test_cli_reports_user_errors_in_one_line(folders, tmp_path, capsys):
    assert main([str(tmp_path / "nowhere"), str(folders[1])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: truth folder") and "nowhere" in err and "\n" not in err
    (folders[1] / "ISIC_0000001.png").unlink()
    assert main([str(folders[0]), str(folders[1])]) == 2
    assert "ISIC_0000001" in capsys.readouterr().err


def test_matches_official_package(tmp_path):
    isic_scoring = pytest.importorskip("isic_challenge_scoring")
    from isic_challenge_scoring import metrics as official_metrics
    from isic_challenge_scoring.confusion import create_binary_confusion_matrix

    rng = np.random.default_rng(7)
    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    truth_dir.mkdir()
    pred_dir.mkdir()
    cases = []
    for i in range(16):
        height, width = int(rng.integers(24, 64)), int(rng.integers(24, 64))
        truth = _blob(rng, height, width)
        # Predictions: a shifted, grown or shrunk copy, an unrelated blob, or grey levels around the 128 rule.
        kind = i % 4
        if kind == 0:
            pred = np.roll(truth, (int(rng.integers(-4, 5)), int(rng.integers(-4, 5))), axis=(0, 1))
        elif kind == 1:
            pred = cv2.dilate(truth, np.ones((3, 3), np.uint8), iterations=int(rng.integers(1, 4)))
        elif kind == 2:
            pred = _blob(rng, height, width)
        else:
            pred = rng.choice(np.array([0, 127, 128, 129, 200, 255], np.uint8), size=(height, width))
        cases.append((truth, pred))
    cases.append((np.zeros((20, 30), np.uint8), np.zeros((20, 30), np.uint8)))
    cases.append((np.zeros((20, 30), np.uint8), _blob(rng, 20, 30)))
    cases.append((np.full((20, 30), 255, np.uint8), _blob(rng, 20, 30)))
    for i, (truth, pred) in enumerate(cases):
        cv2.imwrite(str(truth_dir / f"ISIC_{i:07d}_segmentation.png"), truth)
        cv2.imwrite(str(pred_dir / f"ISIC_{i:07d}_segmentation.png"), pred)

    per_image, means = score_folders(truth_dir, pred_dir)
    official_names = {"thresholded_jaccard": "threshold_jaccard"}
    for (truth, pred), (_, ours) in zip(cases, per_image):
        matrix = create_binary_confusion_matrix(truth > 128, pred > 128)
        for name in METRICS:
            function = getattr(official_metrics, "binary_" + official_names.get(name, name))
            assert ours[name] == pytest.approx(float(function(matrix)), abs=1e-6), name
    official = isic_scoring.SegmentationScore.from_dir(truth_dir, pred_dir).macro_average
    for name in METRICS:
        assert means[name] == pytest.approx(float(official[official_names.get(name, name)]), abs=1e-6), name
