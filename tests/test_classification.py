"""Classification stage: backbone registry, SE block, training loop, metrics, cached probability tables, Grad-CAM."""

import csv
import json

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dermpipe.classification import training
from dermpipe.classification.backbones import (
    BACKBONES,
    TEST_BACKBONE,
    BackboneError,
    SEBlock,
    build_classifier,
    checkpoint_metadata,
    load_classifier,
    resolve_backbone,
)
from dermpipe.classification.config import ClassificationConfig
from dermpipe.classification.evaluation import ProbabilityScorer
from dermpipe.classification.gradcam import gradcam_overlays
from dermpipe.classification.losses import FocalLoss
from dermpipe.classification.metrics import classification_report
from dermpipe.classification.prediction import CropProbabilities, predict_probabilities
from dermpipe.classification.train import main
from dermpipe.data.generator import generate_dataset
from dermpipe.data.manifest import Manifest
from dermpipe.engine.cache import StageCache
from dermpipe.engine.checkpoint import CheckpointError, save_checkpoint, weights_digest
from dermpipe.engine.files import file_digest
from dermpipe.engine.loop import evaluate, train_one_epoch
from dermpipe.engine.run import Run
from dermpipe.engine.schedules import Schedule

TINY = TEST_BACKBONE


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def crops_manifest(tmp_path_factory):
    """A synthetic data set as the segmentation stage would hand it over: crop_path and crop_key per row."""
    root = tmp_path_factory.mktemp("synthetic")
    path = generate_dataset(root / "syn", n_images=36, size=48, seed=0, classes=("nv", "mel"), imbalance=1.5)
    manifest = Manifest.read(path)
    manifest = manifest.with_column("crop_path", [r["image_path"] for r in manifest.rows])
    manifest = manifest.with_column("crop_key", [file_digest(r["image_path"]) for r in manifest.rows])
    return manifest.write(root / "crops.csv")


def _args(manifest, out, *extra):
    return [
        "--manifest", str(manifest), "--backbone", TINY, "--out", str(out), "--device", "cpu",
        "--set", "model.pretrained=false", "--set", "data.image_size=32", "--set", "train.epochs=2",
        "--set", "train.batch_size=8", "--set", "train.freeze_epochs=1", "--set", "train.lr=0.003",
        "--set", f"run.cache_dir={out / 'cache'}", "--set", "run.threads=1", *extra,
    ]  # fmt: skip


def _error_lines(stderr):
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- registry and model ---------------------------------------------------------------------------------------------


def test_unknown_backbone_lists_close_matches():
    with pytest.raises(BackboneError, match="did you mean.*resnet50"):
        resolve_backbone("resnet5O")
    with pytest.raises(BackboneError, match="xception"):
        resolve_backbone("xcepton")


def test_registry_names_timm_models_at_native_sizes():
    assert set(BACKBONES) == {"resnet50", "densenet169", "inception_v3", "inception_resnet_v2", "xception"}
    assert {BACKBONES[n].input_size for n in ("inception_v3", "inception_resnet_v2", "xception")} == {299}
    assert BACKBONES["xception"].timm_name == "legacy_xception"


def test_any_timm_cnn_builds_and_a_token_model_is_refused():
    model = build_classifier("test_efficientnet", 3, drop_rate=0.0).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert model.data_config["input_size"] == 160  # timm's own config for this model, not a hard-coded default
    with pytest.raises(BackboneError, match="feature map"):
        build_classifier("test_vit", 3)


# Small models of six timm families; in the first two the map the backbone gives is wider than timm's num_features
# (a 1x1 conv follows it), so an SE block sized from num_features would fail on the first batch.
FAMILIES = ["mobilenetv3_small_050", "ghostnet_050", "test_efficientnet", "test_convnext", "regnetx_002", "test_nfnet"]


@pytest.mark.parametrize("name", FAMILIES)
def test_se_block_is_sized_from_the_feature_map_the_backbone_really_gives(name):
    model = build_classifier(name, 3, drop_rate=0.0).eval()
    fmap = model.backbone(torch.zeros(1, 3, 64, 64))
    assert model.se.excite[0].in_features == fmap.shape[1] == model.head.in_features
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    if name.startswith(("mobilenetv3", "ghostnet")):
        assert fmap.shape[1] != model.backbone.num_features  # the case that used to fail


def test_a_vision_transformer_is_refused_naming_the_reason():
    with pytest.raises(BackboneError, match=r"tokens\), not a B x C x H x W feature map"):
        build_classifier("test_vit", 3)


def test_se_block_sits_on_the_feature_map_and_changes_outputs():
    torch.manual_seed(0)
    model = build_classifier(TINY, 3, drop_rate=0.0).eval()
    assert isinstance(model.se, SEBlock)
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    fmap = model.backbone(x)
    assert model.features(x).shape == fmap.shape
    with torch.no_grad():
        model.se.excite[2].bias.fill_(-30.0)  # gate ~0: every channel switched off
        model.se.excite[2].weight.zero_()
    after = model(x)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, model.head.bias.expand_as(after), atol=1e-5)


FAST_BACKBONES = ["resnet50", "densenet169"]


@pytest.mark.parametrize(
    "name", [n if n in FAST_BACKBONES else pytest.param(n, marks=pytest.mark.slow) for n in BACKBONES]
)
def test_default_backbones_build_and_run(name):
    model = build_classifier(name, 4).eval()
    size = max(model.min_input_size, 64)  # the Inception stems need 75 px
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 4)
    assert model.data_config["input_size"] == BACKBONES[name].input_size
    assert len(model.data_config["mean"]) == 3


def test_segmentation_checkpoint_is_refused_as_classifier(tmp_path):
    path = save_checkpoint(tmp_path / "unet.safetensors", torch.nn.Linear(2, 2), {"stage": "segmentation"})
    with pytest.raises(CheckpointError, match="stage='segmentation'"):
        load_classifier(path)


@pytest.mark.parametrize("se_reduction", [16, 0])
def test_checkpoint_round_trip_rebuilds_the_model(tmp_path, se_reduction):
    model = build_classifier(TINY, 3, drop_rate=0.1, se_reduction=se_reduction).eval()
    assert isinstance(model.se, SEBlock) == bool(se_reduction)  # 0: the ablation without the SE block
    model.input_size = 48
    path = save_checkpoint(tmp_path / "best.safetensors", model, checkpoint_metadata(model, ["a", "b", "c"]))
    loaded, meta = load_classifier(path)
    x = torch.randn(2, 3, 48, 48)
    assert meta["classes"] == ["a", "b", "c"] and loaded.input_size == 48
    assert torch.equal(model(x), loaded(x)) and type(loaded.se) is type(model.se)


# --- training pieces ------------------------------------------------------------------------------------------------


def _blob_tensors(n, rng, size=32):
    """Easy crops made here (not by data.synthetic, so they do not move with it): a dark brown or a pink-red lesion."""
    images, labels = [], []
    colours = np.array([[90, 50, 30], [200, 60, 80]])
    for i in range(n):
        label = i % 2
        image = (np.array([225, 180, 160]) + rng.normal(0, 12, (size, size, 3))).clip(0, 255).astype(np.uint8)
        centre = rng.integers(size // 3, 2 * size // 3, 2)
        colour = (colours[label] + rng.normal(0, 15, 3)).clip(0, 255)
        cv2.circle(
            image, (int(centre[0]), int(centre[1])), int(rng.integers(size // 6, size // 3)), colour.tolist(), -1
        )
        images.append(image)
        labels.append(label)
    x = torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, torch.tensor(labels)


def _cpu_run(tmp_path):
    return Run(tmp_path, torch.device("cpu"), amp=False, channels_last=False, config_hash="test")


def test_tiny_backbone_beats_chance_after_a_few_steps(tmp_path):
    rng = np.random.default_rng(0)
    x_train, y_train = _blob_tensors(64, rng)
    x_test, y_test = _blob_tensors(32, rng)
    torch.manual_seed(0)
    model = build_classifier(TINY, 2, drop_rate=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    run = _cpu_run(tmp_path)
    for _ in range(8):  # 64 steps of 8 images
        order = torch.randperm(64)
        batches = [(x_train[order[i : i + 8]], y_train[order[i : i + 8]]) for i in range(0, 64, 8)]
        stats = train_one_epoch(model, batches, torch.nn.CrossEntropyLoss(), optimizer, None, run, scaler)
    scorer = ProbabilityScorer(["brown", "red"])
    result = evaluate(model, [(x_test, y_test)], run, scorer)
    probs, labels = scorer.arrays()
    report = classification_report(labels, probs, ["brown", "red"])
    assert stats["train_loss"] < 0.3 and stats["images_per_sec"] > 0
    assert report["balanced_accuracy"] >= 0.8  # chance is 0.5
    assert result["val_balanced_accuracy"] == report["balanced_accuracy"]


def test_frozen_backbone_keeps_weights_and_batchnorm_statistics(tmp_path):
    torch.manual_seed(0)
    model = build_classifier(TINY, 2)
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.head.weight.clone()
    model.set_backbone_trainable(False)
    optimizer = training.build_optimizer(model, ClassificationConfig())
    batches = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]))] * 3
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_one_epoch(model, batches, torch.nn.CrossEntropyLoss(), optimizer, None, _cpu_run(tmp_path), scaler)
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in backbone_before.items())
    assert not torch.equal(head_before, model.head.weight)


def test_focal_loss_with_gamma_zero_is_cross_entropy():
    logits, target = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    weight = torch.tensor([1.0, 2.0, 0.5])
    focal = FocalLoss(gamma=0.0, weight=weight, label_smoothing=0.1)
    ce = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1)
    assert torch.allclose(focal(logits, target), ce(logits, target), atol=1e-6)
    assert FocalLoss(gamma=2.0)(logits, target) < torch.nn.CrossEntropyLoss()(logits, target)


def test_schedule_warms_up_and_restarts_warmup_scaled_at_unfreeze():
    # 4 epochs of 10 steps, 1 warm-up epoch, the backbone unfrozen after 2 epochs at a tenth of the rate
    for kind in ("cosine", "onecycle"):
        factors = [Schedule(kind, 40, 10, phase_start=20, phase_scale=0.1).factor(step) for step in range(40)]
        assert factors[0] < factors[5] < factors[9] <= 1.0  # warm-up over the first epoch
        assert factors[20] < 0.1 * factors[19]  # unfreeze: warm-up again, at a tenth of the rate
        assert max(factors[20:]) <= 0.1 + 1e-9 and factors[39] < factors[30]


def test_onecycle_is_torchs_one_cycle_learning_rate():
    """One meaning of "onecycle" in both stages: the learning rate torch's OneCycleLR draws (without momentum)."""

    def trace(make_scheduler):
        optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=0.1)
        scheduler = make_scheduler(optimizer)
        steps = []
        for _ in range(50):
            steps.append((optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["betas"][0]))
            optimizer.step()
            scheduler.step()
        return steps

    expected = trace(lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=50, pct_start=0.2))
    ours = trace(Schedule("onecycle", 50, 10).scheduler)
    assert [lr for lr, _ in ours] == pytest.approx([lr for lr, _ in expected], rel=1e-9, abs=1e-12)
    assert [b for _, b in ours] == pytest.approx([b for _, b in expected], rel=1e-9)  # beta1 cycled 0.95-0.85-0.95
    assert Schedule("cosine", 50, 10).momentum(3) is None  # cosine leaves the optimiser's momentum alone


# --- metrics --------------------------------------------------------------------------------------------------------


def test_metrics_on_a_hand_made_example():
    # true: a a a b b c;  predicted: a a b b b a  -> recall a 2/3, b 2/2, c 0/1
    y_true = [0, 0, 0, 1, 1, 2]
    predicted = [0, 0, 1, 1, 1, 0]
    probs = np.full((6, 4), 0.1)
    probs[np.arange(6), predicted] = 0.7
    report = classification_report(y_true, probs, ["a", "b", "c", "d"])
    assert report["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)  # class d absent: not averaged
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["per_class"]["a"]["specificity"] == pytest.approx(2 / 3)  # of 3 non-a images, 1 called a
    assert report["per_class"]["b"]["specificity"] == pytest.approx(3 / 4)
    assert report["per_class"]["c"]["specificity"] == pytest.approx(1.0)
    assert report["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert report["confusion_matrix"][0] == [2, 1, 0, 0] and report["confusion_matrix"][2] == [1, 0, 0, 0]
    assert report["auc_skipped"] == ["d"] and report["per_class"]["d"]["auc"] is None
    assert report["per_class"]["b"]["auc"] == pytest.approx(7 / 8)  # 8 pairs; the a image scored 0.7 ties twice


# --- probabilities --------------------------------------------------------------------------------------------------


def test_probabilities_sum_to_one_and_tta_is_rotation_invariant():
    torch.manual_seed(0)
    model = build_classifier(TINY, 3).eval()
    model.input_size = 32
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(5)]
    plain = predict_probabilities(model, images, batch_size=2)
    tta = predict_probabilities(model, images, tta=True, batch_size=2)
    rotated = predict_probabilities(model, [np.ascontiguousarray(np.rot90(i)) for i in images], tta=True)
    assert plain.shape == (5, 3) and np.allclose(plain.sum(axis=1), 1.0, atol=1e-5)
    assert np.allclose(tta.sum(axis=1), 1.0, atol=1e-5)
    assert not np.allclose(plain, tta)
    assert np.allclose(tta, rotated, atol=1e-5)  # TTA averages over all 8 flips/rotations


def test_crop_probabilities_reused_per_crop_and_invalidated_when_checkpoint_or_crop_changes(tmp_path):
    torch.manual_seed(0)
    model = build_classifier(TINY, 2).eval()
    model.input_size = 32
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(4)]
    keys = ["k0", "k1", "k2", "k3"]
    ckpt = tmp_path / "best.safetensors"

    def predict(crop_keys, stage_cache):
        predictor = CropProbabilities(model, weights_digest(ckpt), stage_cache, batch_size=3)
        return predictor(crop_keys, lambda i: images[i])

    save_checkpoint(ckpt, model, checkpoint_metadata(model, ["a", "b"]))
    first = StageCache(tmp_path / "cache", "crop_probabilities")
    probs = predict(keys, first)
    assert np.allclose(probs, predict_probabilities(model, images, batch_size=3))  # the cache changes no number
    again = StageCache(tmp_path / "cache", "crop_probabilities")
    images.reverse()  # the same crops asked for in another order come back in that order, all from the cache
    cached = predict(keys[::-1], again)
    assert (first.computed, again.reused, again.computed) == (4, 4, 0)
    assert np.array_equal(cached, probs[::-1])
    with torch.no_grad():
        model.head.bias[0] += 1.0  # shifts class a only (a shift of every logit would not change softmax)
    save_checkpoint(ckpt, model, checkpoint_metadata(model, ["a", "b"]))
    changed = StageCache(tmp_path / "cache", "crop_probabilities")
    new_probs = predict(keys[::-1], changed)
    assert (changed.reused, changed.computed) == (0, 4) and not np.allclose(new_probs, cached)
    crop_changed = StageCache(tmp_path / "cache", "crop_probabilities")
    predict(["k3", "k2", "k1", "k9"], crop_changed)
    assert (crop_changed.reused, crop_changed.computed) == (3, 1)


def test_gradcam_overlay_has_the_crop_size():
    torch.manual_seed(0)
    model = build_classifier(TINY, 2).eval()
    model.input_size = 32
    rng = np.random.default_rng(3)
    crops = [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)]
    overlays = gradcam_overlays(model, crops, target_classes=[0, 1])
    assert [o.shape for o in overlays] == [(50, 70, 3), (64, 64, 3)]
    assert all(o.dtype == np.uint8 for o in overlays)
    assert not np.array_equal(overlays[0], crops[0])
    assert all(p.grad is None for p in model.parameters())  # nothing left behind for an optimiser


# --- the script -----------------------------------------------------------------------------------------------------


def test_main_trains_writes_everything_and_reuses_on_rerun(crops_manifest, tmp_path, capsys, caplog):
    out = tmp_path / "runs"
    assert main(_args(crops_manifest, out, "--set", "train.gradcam_images=2")) == 0
    summary = capsys.readouterr().out
    assert "val balanced accuracy" in summary and "test balanced accuracy" in summary
    run_dir = out / TINY
    for name in (
        "best.safetensors",
        "last.safetensors",
        "last_state.pt",
        "config.yaml",
        "learning_curves.png",
        "confusion_val.csv",
        "confusion_val.png",
        "confusion_test.csv",
        "metrics_test.json",
    ):
        assert (run_dir / name).is_file(), name
    assert [r["epoch"] for r in _rows(run_dir / "metrics.csv")] == ["1", "2"]
    assert len(list((run_dir / "gradcam").glob("*.png"))) == 2
    manifest = Manifest.read(crops_manifest)
    for split in ("val", "test"):
        rows = _rows(run_dir / f"probs_{split}.csv")
        expected = manifest.select(split)
        assert [r["image_id"] for r in rows] == [r["image_id"] for r in expected.rows]
        assert [r["crop_key"] for r in rows] == [r["crop_key"] for r in expected.rows]
        assert np.allclose([float(r["nv"]) + float(r["mel"]) for r in rows], 1.0, atol=1e-5)
        info = json.loads((run_dir / f"probs_{split}.json").read_text())
        assert info["source"] == split and info["trained_on"] == "train" and info["classes"] == ["nv", "mel"]
        assert info["weights_digest"] == weights_digest(run_dir / "best.safetensors")
    model, meta = load_classifier(run_dir / "best.safetensors")
    assert meta["input_size"] == 32 and meta["backbone"] == TINY and meta["image_column"] == "crop_path"

    digest = weights_digest(run_dir / "best.safetensors")
    caplog.clear()
    assert main(_args(crops_manifest, out)) == 0
    assert weights_digest(run_dir / "best.safetensors") == digest  # training was not repeated
    assert "computed (crop_probabilities)" in caplog.text and " 0 computed (crop_probabilities)" in caplog.text
    for split in ("val", "test"):  # each table's sidecar names the checkpoint, the settings and the table's identity
        info = json.loads((run_dir / f"probs_{split}.json").read_text())
        assert {"backbone", "classes", "split", "source", "trained_on", "weights_digest", "table_key"} <= set(info)


def test_resume_continues_to_the_same_result(crops_manifest, tmp_path, interrupt_epoch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = ("--set", "train.gradcam_images=0", "--set", "train.freeze_epochs=0")
    assert main(_args(crops_manifest, straight, *extra)) == 0
    restore = interrupt_epoch(2)
    assert main(_args(crops_manifest, resumed, *extra)) == 130
    assert len(_rows(resumed / TINY / "metrics.csv")) == 1
    restore()
    assert main(_args(crops_manifest, resumed, *extra, "--resume")) == 0
    assert [r["epoch"] for r in _rows(resumed / TINY / "metrics.csv")] == ["1", "2"]
    a = load_file(straight / TINY / "last.safetensors")
    b = load_file(resumed / TINY / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _probs(path):
    return np.array([[float(r["nv"]), float(r["mel"])] for r in _rows(path)])


@pytest.mark.e2e
def test_folds_write_one_out_of_fold_table_and_the_mean_of_the_fold_models(crops_manifest, tmp_path, caplog):
    from dermpipe.classification.backbones import FoldMeanClassifier, load_classifier
    from dermpipe.engine.checkpoint import read_metadata, weights_digest

    out = tmp_path / "runs"
    quick = ("--set", "train.epochs=1", "--set", "train.gradcam_images=2", "--set", "train.freeze_epochs=0")
    assert main(_args(crops_manifest, out, "--folds", "2", *quick)) == 0
    run = out / TINY
    train_ids = sorted(r["image_id"] for r in Manifest.read(crops_manifest).select("train").rows)
    oof = _rows(run / "probs_oof.csv")
    assert sorted(r["image_id"] for r in oof) == train_ids  # every training image once, predicted out of fold
    fold0 = {r["image_id"] for r in _rows(run / "fold0" / "probs_oof.csv")}
    fold1 = {r["image_id"] for r in _rows(run / "fold1" / "probs_oof.csv")}
    assert fold0 and fold1 and not fold0 & fold1
    info = json.loads((run / "probs_oof.json").read_text())
    assert info["source"] == "oof" and len(info["fold_tables"]) == 2

    # the default model of the val/test tables and of prediction: the mean of the fold models, nothing refitted
    folds = [run / f"fold{i}" / "best.safetensors" for i in range(2)]
    meta = read_metadata(run / "best.safetensors")
    assert meta["fold_models"] == 2 and meta["fold_weights"] == [weights_digest(p) for p in folds]
    assert not (run / "last.safetensors").exists()
    for split in ("val", "test"):
        mean = (_probs(run / "fold0" / f"probs_{split}.csv") + _probs(run / "fold1" / f"probs_{split}.csv")) / 2
        assert np.allclose(_probs(run / f"probs_{split}.csv"), mean, atol=1e-5)
        assert (
            json.loads((run / f"probs_{split}.json").read_text())["trained_on"] == "train (mean of the 2 fold models)"
        )
    model, _ = load_classifier(run / "best.safetensors")
    members = [load_classifier(p)[0] for p in folds]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = torch.stack([torch.softmax(m(x), 1) for m in members]).mean(0)
        assert isinstance(model, FoldMeanClassifier) and torch.allclose(torch.softmax(model(x), 1), expected, atol=1e-6)
    assert len(list((run / "gradcam").glob("*.png"))) == 2  # Grad-CAM over the mean's output, the members' maps
    assert [r["fold"] for r in _rows(run / "metrics.csv")] == ["0", "1"]  # each fold's epochs, for the bundle
    stamp = (run / "best.safetensors").stat().st_mtime_ns
    assert main(_args(crops_manifest, out, "--folds", "2", *quick)) == 0
    assert (run / "best.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten

    # refit: one more model on the whole training split; then back to the mean, which is made again alike
    assert main(_args(crops_manifest, out, "--folds", "2", "--fold-models", "refit", *quick)) == 0
    assert "fold_models" not in read_metadata(run / "best.safetensors") and (run / "last.safetensors").is_file()
    assert json.loads((run / "probs_test.json").read_text())["trained_on"] == "train"
    caplog.clear()
    assert main(_args(crops_manifest, out, "--folds", "2", *quick)) == 2  # a refit is trained work: kept unless asked
    assert main(_args(crops_manifest, out, "--folds", "2", *quick, "--force")) == 0  # folds retrained, mean made
    assert "replacing it by the mean of the 2 fold models" in caplog.text
    assert read_metadata(run / "best.safetensors")["fold_weights"] == [weights_digest(p) for p in folds]
    mean = (_probs(run / "fold0" / "probs_test.csv") + _probs(run / "fold1" / "probs_test.csv")) / 2
    assert np.allclose(_probs(run / "probs_test.csv"), mean, atol=1e-5)


def test_user_mistakes_give_one_line_errors(crops_manifest, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(_args(crops_manifest, out, "--backbone", "resnet5O")) == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and errors[0].startswith("error: unknown backbone 'resnet5O'") and "resnet50" in errors[0]
    assert not out.exists()  # refused before making a run folder
    assert main(_args(tmp_path / "missing.csv", out)) == 2
    assert "missing.csv" in _error_lines(capsys.readouterr().err)[0]
    plain = Manifest.read(crops_manifest)
    plain = Manifest(
        tuple({k: v for k, v in r.items() if k not in ("crop_path", "crop_key")} for r in plain.rows), plain.classes
    )
    path = plain.write(tmp_path / "plain.csv")
    assert main(_args(path, out)) == 2
    assert "--no-crop" in _error_lines(capsys.readouterr().err)[0]
    assert main(_args(path, out, "--set", "train.epochs=1", "--set", "train.gradcam_images=0", "--no-crop")) == 0
    info = json.loads((out / TINY / "probs_val.json").read_text())
    assert info["settings"]["image_column"] == "image_path"


def test_training_options_run_end_to_end(crops_manifest, tmp_path, caplog):
    out = tmp_path / "runs"
    options = [
        "data.balance.sampler=hybrid", "data.balance.oversample_target=12", "data.balance.undersample_target=14",
        "data.balance.class_weights=effective", "train.loss=focal", "train.label_smoothing=0.1",
        "train.optimizer=sgd", "train.schedule=onecycle", "train.tta=true", "train.epochs=1",
        "train.gradcam_images=0", "train.grad_clip=1.0",
    ]  # fmt: skip
    assert main(_args(crops_manifest, out, *[a for o in options for a in ("--set", o)])) == 0
    assert "hybrid sampling per epoch" in caplog.text and "boosted twice" in caplog.text
    train_counts = Manifest.read(crops_manifest).select("train").class_counts()
    assert max(train_counts.values()) > 14 or min(train_counts.values()) < 12  # the sampler had work to do
    info = json.loads((out / TINY / "probs_test.json").read_text())
    assert info["settings"]["tta"] is True
    rows = _rows(out / TINY / "probs_test.csv")
    assert np.allclose([float(r["nv"]) + float(r["mel"]) for r in rows], 1.0, atol=1e-5)


def test_local_pretrained_weights_file_is_loaded_without_its_head(tmp_path):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model(TINY, num_classes=10)
    save_file(source.state_dict(), str(tmp_path / "weights.safetensors"))
    model = build_classifier(TINY, 2, pretrained=str(tmp_path / "weights.safetensors"))
    assert torch.equal(model.backbone.conv1[0].weight, source.conv1[0].weight)
    with pytest.raises(CheckpointError, match="not found"):
        build_classifier(TINY, 2, pretrained=str(tmp_path / "missing.pth"))


def test_epochs_flag_sets_train_epochs_over_the_config(crops_manifest, tmp_path):
    out = tmp_path / "runs"
    assert main(_args(crops_manifest, out, "--epochs", "1", "--set", "train.gradcam_images=0")) == 0  # _args: 2
    assert [r["epoch"] for r in _rows(out / TINY / "metrics.csv")] == ["1"]
