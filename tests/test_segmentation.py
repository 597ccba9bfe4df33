"""Segmentation stage: training lowers the loss, resume, boxes cover lesions, cache reuse, whole-image fallback."""

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dermpipe.data.generator import generate_dataset, make_sample
from dermpipe.data.listing import manifest_from_folder
from dermpipe.data.manifest import Manifest
from dermpipe.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dermpipe.engine.files import output_stem
from dermpipe.segmentation import predict as predict_script
from dermpipe.segmentation import train as train_script
from dermpipe.segmentation.config import SegmentationConfig, SegModelConfig
from dermpipe.segmentation.lesion import (
    FALLBACK_ALL_BORDERS,
    FALLBACK_NO_LESION,
    FALLBACK_TOO_SMALL,
    crop_to_lesion,
    lesion_box,
)
from dermpipe.segmentation.model import ModelBuildError, build_unet, load_unet
from dermpipe.segmentation.prediction import SegmentationPredictor, predict_probabilities

TINY = [
    "--set", "model.encoder=tu-test_resnet", "--set", "model.encoder_weights=null",
    "--set", "model.decoder_channels=[32,16,16,8,8]", "--set", "data.image_size=48", "--set", "train.batch_size=8",
    "--set", "train.lr=0.01", "--set", "train.panel_images=2", "--set", "run.threads=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    manifest = generate_dataset(root / "data", n_images=40, size=64, seed=3, hair=0.0, ruler=0.0)
    return root, manifest


@pytest.fixture(scope="module")
def trained(synthetic):
    root, manifest = synthetic
    run = root / "seg"
    args = ["--manifest", str(manifest), "--out", str(run), "--epochs", "6", "--device", "cpu",
            "--set", f"run.cache_dir={root / 'cache'}", *TINY]  # fmt: skip
    assert train_script.main(args) == 0
    return root, manifest, run


def _metrics(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.e2e
def test_training_lowers_loss_and_writes_run(trained):
    _, _, run = trained
    rows = _metrics(run)
    assert len(rows) == 6
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"])
    for name in ("best.safetensors", "last.safetensors", "last_state.pt", "config.yaml", "curves.png",
                 "val_panel.png", "train.log"):  # fmt: skip
        assert (run / name).is_file(), name
    model, meta = load_unet(run / "best.safetensors")
    assert meta["stage"] == "segmentation" and meta["input_size"] == 48
    assert model(torch.zeros(1, 3, 48, 48)).shape == (1, 1, 48, 48)


@pytest.mark.e2e
def test_resume_restores_weights_and_optimiser_and_ends_where_an_uninterrupted_run_ends(
    synthetic, tmp_path, interrupt_epoch
):
    root, manifest = synthetic
    args = ["--device", "cpu", "--manifest", str(manifest), "--set", f"run.cache_dir={root / 'cache'}",
            "--set", "train.panel_images=0", "--set", "train.max_steps_per_epoch=2", "--epochs", "2",
            *TINY]  # fmt: skip
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    assert train_script.main([*args, "--out", str(straight)]) == 0
    restore = interrupt_epoch(2)
    assert train_script.main([*args, "--out", str(cut)]) == 130  # Ctrl-C in epoch 2: epoch 1 kept
    restore()
    assert [r["epoch"] for r in _metrics(cut)] == ["1"]
    assert train_script.main([*args, "--out", str(cut), "--resume"]) == 0
    assert [r["epoch"] for r in _metrics(cut)] == ["1", "2"]
    a, _ = load_checkpoint(straight / "last.safetensors")
    b, _ = load_checkpoint(cut / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the weights of epoch 1 and the optimiser were restored exactly
    sa = torch.load(straight / "last_state.pt", weights_only=True)
    sb = torch.load(cut / "last_state.pt", weights_only=True)
    moments = [(sa["optimizer"]["state"][i], sb["optimizer"]["state"][i]) for i in sa["optimizer"]["state"]]
    assert moments and all(torch.equal(x["exp_avg_sq"], y["exp_avg_sq"]) for x, y in moments)
    assert sa["scheduler"]["last_epoch"] == sb["scheduler"]["last_epoch"] == 4

    # a resume with other settings is refused with one line, and the run is left as it was
    before = (cut / "last.safetensors").read_bytes()
    assert train_script.main([*args, "--out", str(cut), "--resume", "--epochs", "3"]) == 2
    assert (cut / "last.safetensors").read_bytes() == before


@pytest.mark.e2e
def test_rerun_with_the_same_settings_reuses_the_finished_run(trained, capsys):
    root, manifest, run = trained
    digest = (run / "best.safetensors").read_bytes()
    args = ["--manifest", str(manifest), "--out", str(run), "--epochs", "6", "--device", "cpu",
            "--set", f"run.cache_dir={root / 'cache'}", *TINY]  # fmt: skip
    assert train_script.main(args) == 0
    assert (run / "best.safetensors").read_bytes() == digest
    assert len(_metrics(run)) == 6


@pytest.mark.e2e
def test_boxes_cover_true_lesions_and_cache_is_reused(trained, tmp_path, capsys):
    root, manifest, run = trained
    out = tmp_path / "crops"
    args = ["--manifest", str(manifest), "--run", str(run), "--out", str(out), "--device", "cpu",
            "--set", f"run.cache_dir={tmp_path / 'cache'}", "--set", "predict.crop_size=32", "--masks"]  # fmt: skip
    assert predict_script.main(args) == 0
    assert "0 reused, 40 computed" in capsys.readouterr().out
    crops = Manifest.read(out / "crops.csv")
    assert len(crops) == 40 and {"crop_path", "crop_key", "box", "fallback"} <= set(crops.columns)
    covered = []
    for row in crops.rows:
        truth = cv2.imread(row["mask_path"], cv2.IMREAD_GRAYSCALE) > 127
        x0, y0, x1, y1 = map(int, row["box"].split())
        covered.append(truth[y0:y1, x0:x1].sum() / truth.sum())
        assert cv2.imread(row["crop_path"]).shape == (32, 32, 3)
        assert Path(row["crop_path"]).name == f"{output_stem(row['image_id'])}.png"  # crop files named by id
    assert np.median(covered) > 0.95, covered
    masks = sorted((out / "masks").glob("*_segmentation.png"))
    assert len(masks) == 40 and set(np.unique(cv2.imread(str(masks[0]), cv2.IMREAD_GRAYSCALE))) <= {0, 255}
    # a second run computes nothing and writes the same table
    before = (out / "crops.csv").read_text()
    assert predict_script.main(args) == 0
    assert "40 reused, 0 computed" in capsys.readouterr().out
    assert (out / "crops.csv").read_text() == before


@pytest.mark.e2e
def test_changed_pixel_or_weights_miss_the_cache(trained, tmp_path):
    root, manifest, run = trained
    cfg = SegmentationConfig()
    image = tmp_path / "a.png"
    rgb, _ = make_sample(np.random.default_rng(0), "nv", 64)
    cv2.imwrite(str(image), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    predictor = SegmentationPredictor(run / "best.safetensors", cfg, torch.device("cpu"), tmp_path / "cache")
    first = next(predictor.crop([("a", str(image))]))
    assert predictor.cache.computed == 1
    next(predictor.crop([("a", str(image))]))
    assert predictor.cache.reused == 1
    rgb[10, 10, 0] ^= 1
    cv2.imwrite(str(image), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert next(predictor.crop([("a", str(image))])).crop_key != first.crop_key
    same = SegmentationPredictor(run / "best.safetensors", cfg, torch.device("cpu"), tmp_path / "cache")
    assert same.key("x") == predictor.key("x")
    model, meta = load_unet(run / "best.safetensors")
    with torch.no_grad():
        next(p for p in model.parameters() if p.dtype.is_floating_point).add_(1e-3)  # other weights, same model
    other_path = save_checkpoint(tmp_path / "other.safetensors", model, meta)
    other = SegmentationPredictor(other_path, cfg, torch.device("cpu"), tmp_path / "cache")
    assert other.key("x") != predictor.key("x")


@pytest.mark.e2e
def test_no_lesion_falls_back_to_whole_image_and_is_flagged(trained, tmp_path):
    _, _, run = trained
    model, meta = load_unet(run / "best.safetensors")
    head = [m for m in model.segmentation_head.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    torch.nn.init.constant_(head.bias, -50.0)  # a U-Net that finds nothing anywhere
    ckpt = save_checkpoint(tmp_path / "blind.safetensors", model, meta)
    folder = tmp_path / "photos"
    folder.mkdir()
    rgb, _ = make_sample(np.random.default_rng(1), None, 80, lesion=False)
    cv2.imwrite(str(folder / "skin.png"), cv2.cvtColor(rgb[:, :60], cv2.COLOR_RGB2BGR))  # 80 high, 60 wide
    (folder / "notes.jpg").write_text("not an image")
    predictor = SegmentationPredictor(ckpt, SegmentationConfig(), torch.device("cpu"), tmp_path / "cache")
    results = list(predictor.crop((r["image_id"], r["image_path"]) for r in manifest_from_folder(folder).rows))
    by_id = {r.image_id: r for r in results}
    assert by_id["skin"].box.fallback == FALLBACK_NO_LESION
    assert by_id["skin"].box.as_text() == "0 10 60 70"  # the centre square
    assert "notes.jpg" in by_id["notes"].reason  # skipped, reported, the run went on


def test_lesion_box_rules():
    mask = np.zeros((100, 200), np.uint8)
    assert lesion_box(mask).fallback == FALLBACK_NO_LESION
    mask[50, 100] = 1
    assert lesion_box(mask, min_area=0.001).fallback == FALLBACK_TOO_SMALL
    assert lesion_box(np.ones((50, 50), np.uint8)).fallback == FALLBACK_ALL_BORDERS
    mask = np.zeros((100, 200), np.uint8)
    mask[40:60, 150:190] = 1  # 40 wide, 20 high, near the right edge
    box = lesion_box(mask, margin=0.1)
    assert box.fallback == "" and box.x1 - box.x0 == box.y1 - box.y0 == 48
    assert box.x0 <= 150 and box.x1 >= 190 and box.y0 <= 40 and box.y1 >= 60 and box.x1 <= 200
    image = np.zeros((100, 200, 3), np.uint8)
    image[mask.astype(bool)] = 255
    crop = crop_to_lesion(image, box, 24)
    assert crop.shape == (24, 24, 3) and crop[12, 12].tolist() == [255, 255, 255]


def test_unknown_encoder_and_foreign_checkpoint(tmp_path):
    with pytest.raises(ModelBuildError, match="resnet34"):
        build_unet(SegModelConfig(encoder="resnet34x", encoder_weights=None))
    path = save_checkpoint(tmp_path / "cls.safetensors", torch.nn.Linear(2, 2), {"stage": "classification"})
    with pytest.raises(CheckpointError, match="stage"):
        load_unet(path)


def test_script_errors_are_one_line(tmp_path, capsys):
    assert train_script.main(["--manifest", str(tmp_path / "none.csv"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "none.csv" in err and len(err.splitlines()) == 1
    assert train_script.main(["--set", "train.epoch=3"]) == 2
    assert "did you mean 'epochs'" in capsys.readouterr().err


def test_per_image_dice_does_not_let_a_large_lesion_hide_a_missed_small_one():
    from dermpipe.segmentation.training import DiceBCELoss

    target = torch.zeros(2, 1, 32, 32)
    target[0, :, 2:30, 2:30] = 1  # a large lesion, found exactly
    target[1, :, 10:13, 10:13] = 1  # a small lesion, missed entirely
    logits = torch.full_like(target, -20.0)
    logits[0, :, 2:30, 2:30] = 20.0
    batch = DiceBCELoss(1.0, 0.0).dice_loss(logits, target)
    per_image = DiceBCELoss(1.0, 0.0, per_image=True).dice_loss(logits, target)
    assert batch < 0.02  # 9 missed pixels out of 793
    assert per_image == pytest.approx(0.5, abs=0.06)  # one image of two scores 0
    perfect = torch.where(target > 0, 20.0, -20.0)
    assert DiceBCELoss(1.0, 0.0, per_image=True).dice_loss(perfect, target) < 1e-3
    empty = torch.zeros(1, 1, 8, 8)
    assert DiceBCELoss(1.0, 0.0, per_image=True).dice_loss(torch.full_like(empty, -20.0), empty) < 1e-3


def test_lovasz_term_is_per_image_and_added_to_dice_and_bce():
    from dermpipe.segmentation.training import DiceBCELoss

    target = torch.zeros(2, 1, 32, 32)
    target[0, :, 2:30, 2:30] = 1  # a large lesion, found exactly
    target[1, :, 10:13, 10:13] = 1  # a small lesion, missed entirely
    logits = torch.where(target[:1] > 0, 20.0, -20.0)
    logits = torch.cat([logits, torch.full_like(target[1:], -20.0)])
    lovasz = DiceBCELoss(0.0, 0.0, lovasz_weight=1.0)
    found, missed = lovasz(logits[:1], target[:1]), lovasz(logits[1:], target[1:])
    assert found < 1e-6 and missed > 10  # hinge: 1 + 20 per missed pixel, spread by the Jaccard's gradient
    assert lovasz(logits, target) == pytest.approx((found + missed) / 2)  # one Jaccard surrogate per image, averaged
    plain = DiceBCELoss(1.0, 1.0, per_image=True)
    assert DiceBCELoss(1.0, 1.0, True, 0.5)(logits, target) == pytest.approx(
        plain(logits, target) + 0.5 * (found + missed) / 2
    )
    assert DiceBCELoss(1.0, 1.0, True, 0.0)(logits, target) == pytest.approx(plain(logits, target))


@pytest.mark.e2e
def test_weight_average_is_validated_kept_as_best_and_resumed(synthetic, tmp_path, interrupt_epoch):
    root, manifest = synthetic
    base = ["--manifest", str(manifest), "--device", "cpu", "--set", f"run.cache_dir={root / 'cache'}",
            "--set", "train.panel_images=0", "--set", "train.max_steps_per_epoch=3", "--epochs", "2",
            *TINY]  # fmt: skip
    args = [*base, "--set", "train.ema_decay=0.9"]
    assert train_script.main([*args, "--out", str(tmp_path / "whole")]) == 0
    best, _ = load_checkpoint(tmp_path / "whole" / "best.safetensors")
    last, _ = load_checkpoint(tmp_path / "whole" / "last.safetensors")
    whole = torch.load(tmp_path / "whole" / "last_state.pt", weights_only=False)["ema"]
    name = next(k for k in best if k.endswith("weight") and best[k].dtype.is_floating_point)
    assert not torch.equal(best[name], last[name])  # best holds the average, last the trained weights
    assert torch.equal(best[name], whole[name].cpu())  # (val Jaccard rises over the two epochs: best is the last)

    # interrupted in epoch 2 and resumed: the average continues from the saved one, as if never interrupted
    restore = interrupt_epoch(2)
    assert train_script.main([*args, "--out", str(tmp_path / "cut")]) != 0  # interrupted, epoch 1 kept
    restore()
    assert train_script.main([*args, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    resumed = torch.load(tmp_path / "cut" / "last_state.pt", weights_only=False)["ema"]
    assert all(torch.allclose(resumed[k].float(), whole[k].float(), atol=1e-6) for k in whole)

    # a run saved without an average cannot resume with one: refused, not silently restarted
    assert train_script.main([*base, "--out", str(tmp_path / "plain"), "--epochs", "1"]) == 0
    assert train_script.main([*args, "--out", str(tmp_path / "plain"), "--resume"]) != 0


@pytest.mark.e2e
def test_resume_drops_the_metrics_row_of_an_epoch_cut_off_before_its_state_was_saved(
    synthetic, tmp_path, interrupt_epoch
):
    root, manifest = synthetic
    args = ["--manifest", str(manifest), "--device", "cpu", "--set", f"run.cache_dir={root / 'cache'}",
            "--set", "train.panel_images=0", "--set", "train.max_steps_per_epoch=2", "--epochs", "2",
            "--out", str(tmp_path / "run"), *TINY]  # fmt: skip
    restore = interrupt_epoch(2)
    assert train_script.main(args) != 0
    restore()
    metrics = tmp_path / "run" / "metrics.csv"
    with open(metrics, "a") as f:  # epoch 2's row written, then the process died before last_state.pt was saved
        f.write("2,0.001,9,9,0,0,0,1\n")
    assert train_script.main([*args, "--resume"]) == 0
    with open(metrics, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[1]["train_loss"]) != 9


@pytest.mark.e2e
def test_tta_turns_each_view_back():
    torch.manual_seed(0)
    cfg = SegModelConfig(encoder="tu-test_resnet", encoder_weights=None, decoder_channels=(32, 16, 16, 8, 8))
    model = build_unet(cfg).eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    norm = ((0.5,) * 3, (0.25,) * 3, torch.device("cpu"))

    def plain(transform):
        return predict_probabilities(model, [np.ascontiguousarray(transform(i)) for i in images], *norm)

    # flips: the mean of the image and its two flips, each flipped back
    flips = predict_probabilities(model, images, *norm, tta=True)
    expected = (plain(lambda i: i) + plain(lambda i: i[:, ::-1])[:, :, ::-1] + plain(lambda i: i[::-1])[:, ::-1]) / 3
    assert np.allclose(flips, expected, atol=1e-5)
    assert not np.allclose(flips, plain(lambda i: i), atol=1e-3)

    # all eight flips and quarter turns: the average no longer depends on how the image was turned or flipped
    dihedral = predict_probabilities(model, images, *norm, tta=True, rotations=True)
    turned = predict_probabilities(model, [np.ascontiguousarray(np.rot90(i)) for i in images], *norm, True, True)
    mirrored = predict_probabilities(model, [np.ascontiguousarray(i[:, ::-1]) for i in images], *norm, True, True)
    assert np.allclose(np.rot90(turned, -1, axes=(1, 2)), dihedral, atol=1e-5)
    assert np.allclose(mirrored[:, :, ::-1], dihedral, atol=1e-5)
    assert not np.allclose(np.rot90(plain(np.rot90), -1, axes=(1, 2)), plain(lambda i: i), atol=1e-3)
