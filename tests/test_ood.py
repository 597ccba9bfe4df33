"""The out-of-distribution check: junk is referred "unlike the training images", real-looking lesions are not.

The Mahalanobis fit on Gaussian data with a known answer; a tiny pipeline trained on the synthetic generator, whose
classifiers fit the check after training, predicting noise, a flat grey image and synthetic lesions on both engines;
the whole-image fallbacks referred as "no lesion found"; an older root without statistics still predicting.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from dermpipe.classification.ood import OOD_FILE, OOD_REASON, fit_ood, load_ood, read_backbone_ood
from dermpipe.engine.checkpoint import weights_digest

CLASSES_SEEN = 3


def _gaussian(n: int, dim: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points of three classes, each a Gaussian around its own mean, with correlated features."""
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    labels = rng.integers(0, CLASSES_SEEN, n)
    means = rng.normal(scale=4.0, size=(CLASSES_SEEN, dim))
    return means[labels] + rng.normal(size=(n, dim)) @ mixing, labels


def test_the_fit_scores_an_outlier_far_above_and_the_held_out_points_at_the_percentile(tmp_path):
    rng = np.random.default_rng(0)
    x, y = _gaussian(6000, 8, rng)
    train, held, test = (x[:3000], y[:3000]), x[3000:4500], x[4500:]
    stats = fit_ood(*train, held, percentile=95.0, weights_digest="abc", backbone="b")
    # about 5% of fresh in-distribution points pass a threshold set at the 95th percentile of held-out ones
    assert 0.03 < float((stats.score(test) > stats.threshold).mean()) < 0.07
    far = x[:5].mean(0) + 40.0 * np.ones(8)  # far from every class mean
    assert stats.score(far[None])[0] > 3 * stats.threshold
    # along the shared covariance's thin direction a small step is already far: the distance is Mahalanobis, not
    # Euclidean
    thin = np.linalg.eigh(np.cov((x - x.mean(0)).T))[1][:, 0]
    mean0 = train[0][train[1] == 0].mean(0)
    assert stats.score((mean0 + 3.0 * thin)[None])[0] > stats.score((mean0 + 0.3 * thin)[None])[0] * 5
    stats.save(tmp_path / OOD_FILE)
    back = load_ood(tmp_path / OOD_FILE)
    assert back.threshold == stats.threshold and back.info["weights_digest"] == "abc"
    assert back.info["percentile"] == 95.0 and back.info["threshold_split"] == "validation"
    np.testing.assert_array_equal(back.score(test), stats.score(test))


def test_statistics_of_other_weights_are_ignored_and_say_why(tmp_path):
    rng = np.random.default_rng(1)
    x, y = _gaussian(300, 4, rng)
    assert read_backbone_ood(tmp_path, "w")[0] is None and "retrain" in read_backbone_ood(tmp_path, "w")[1]
    fit_ood(x, y, weights_digest="w").save(tmp_path / OOD_FILE)
    assert read_backbone_ood(tmp_path, "w")[0] is not None
    stats, why = read_backbone_ood(tmp_path, "other")
    assert stats is None and "other weights" in why


# --- a tiny pipeline trained on synthetic lesions: each classifier fits the check after training ---


def _junk(folder: Path) -> dict[str, Path]:
    """Junk no dermatoscope takes: uniform noise, a flat grey image, a grey gradient (PNG, lossless)."""
    from dermpipe.data.reading import write_image

    rng = np.random.default_rng(0)
    images = {
        "noise": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
        "grey": np.full((64, 64, 3), 128, np.uint8),
        "gradient": np.repeat(np.linspace(0, 255, 64)[None, :, None], 64, 0).repeat(3, 2).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, image in images.items():
        paths[name] = folder / f"{name}.png"
        write_image(paths[name], image)
    return paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run root trained by ``dermpipe run`` on 80 synthetic images (two tiny backbones), each network exported to
    ONNX beside its weights (as ``dermpipe export`` does in a bundle), and its manifest."""
    from types import SimpleNamespace

    import yaml
    from test_pipeline_run import EXPERIMENT

    from dermpipe.bundle.onnx_export import export_network, load_network
    from dermpipe.data.generator import generate_dataset
    from dermpipe.pipeline.run import main

    folder = tmp_path_factory.mktemp("ood")
    manifest = generate_dataset(folder / "data", n_images=80, size=64, seed=0)
    config = folder / "experiment.yaml"
    config.write_text(yaml.safe_dump(EXPERIMENT))
    root = folder / "root"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            argv = ["--manifest", str(manifest), "--root", str(root), "--config", str(config), "--device", "cpu"]
            assert main(argv) == 0
        networks = {"segmentation/best.safetensors": "segmentation", "ensemble/meta.safetensors": "ensemble"}
        networks.update({f"classification/{b}/best.safetensors": "classification" for b in EXPERIMENT["backbones"]})
        for weights, stage in networks.items():
            net = load_network(SimpleNamespace(path=root), stage, weights, weights_digest(root / weights))
            export_network(net, (root / weights).with_suffix(".onnx"))
    finally:
        torch.set_num_threads(before)
    return {"root": root, "manifest": manifest, "folder": folder}


def _predictor(stages: dict, cache: Path, engine: str = "pytorch"):
    from dermpipe.configs.schema import RunConfig
    from dermpipe.predict.config import PredictConfig
    from dermpipe.predict.predictor import EnsemblePredictor

    cfg = PredictConfig(**stages, engine=engine, run=RunConfig(cache_dir=str(cache), threads=1))
    return EnsemblePredictor(cfg, torch.device("cpu"))


def _root_stages(root: Path) -> dict:
    return {
        "segmentation_run": str(root / "segmentation"),
        "classification_root": str(root / "classification"),
        "ensemble_run": str(root / "ensemble"),
    }


def _reasons(predictor, items) -> dict[str, str]:
    from dermpipe.predict.rows import refer_reason
    from dermpipe.segmentation.prediction import SkipLog

    return {
        crop.image_id: refer_reason(crop, probs, predictor.refer_threshold)
        for crop, probs in predictor.predict(items, SkipLog())
    }


@pytest.mark.e2e
def test_each_trained_backbone_fits_its_check_beside_its_weights(trained):
    for backbone in ("test_resnet", "test_efficientnet"):
        folder = trained["root"] / "classification" / backbone
        stats, why = read_backbone_ood(folder, weights_digest(folder / "best.safetensors"))
        assert stats is not None, why
        assert stats.info["percentile"] == 99.5 and stats.info["threshold_split"] == "validation"
        assert stats.info["fit_images"] > stats.info["threshold_images"] > 0


@pytest.mark.e2e
def test_junk_is_referred_unlike_the_training_images_and_synthetic_lesions_mostly_are_not(trained, tmp_path):
    from dermpipe.data.manifest import Manifest

    junk = _junk(tmp_path / "junk")
    lesions = [(r["image_id"], r["image_path"]) for r in Manifest.read(trained["manifest"]).rows]
    reasons = _reasons(_predictor(_root_stages(trained["root"]), tmp_path / "cache"), [*junk.items(), *lesions])
    for name in ("noise", "grey"):
        assert OOD_REASON in reasons[name], (name, reasons[name])
    unlike = [i for i, _ in lesions if OOD_REASON in reasons[i]]
    assert len(unlike) <= 0.1 * len(lesions), unlike  # the images like the training ones: about 0.5% expected


@pytest.mark.e2e
def test_pytorch_and_onnxruntime_refer_the_same_images_for_the_same_reasons(trained, tmp_path):
    from dermpipe.data.manifest import Manifest

    junk = _junk(tmp_path / "junk")
    items = [*junk.items(), *((r["image_id"], r["image_path"]) for r in Manifest.read(trained["manifest"]).rows[:20])]
    stages = _root_stages(trained["root"])
    on_torch = _reasons(_predictor(stages, tmp_path / "torch"), items)
    on_ort = _reasons(_predictor(stages, tmp_path / "ort", "onnxruntime"), items)
    assert on_torch == on_ort
    assert OOD_REASON in on_ort["noise"]


def test_the_bundle_packs_the_statistics_and_its_card_states_the_thresholds_or_the_check_off(tmp_path, caplog):
    from conftest import write_lineages, write_untrained_pipeline

    from dermpipe.bundle.store import open_bundle
    from dermpipe.bundle.write import write_bundle

    backbones = ["test_resnet", "test_efficientnet"]
    root = write_untrained_pipeline(tmp_path / "root", backbones, ["nv", "mel", "bcc"],
                                    ("segmentation", "classification", "ensemble"))  # fmt: skip
    weights = root / "classification" / "test_resnet" / "best.safetensors"
    x, y = _gaussian(300, 6, np.random.default_rng(2))
    fit_ood(x, y, x[:50], weights_digest=weights_digest(weights)).save(weights.parent / OOD_FILE)
    write_lineages(root, backbones)
    with caplog.at_level(logging.WARNING):
        path = write_bundle(root, tmp_path / "bundle").path
    bundle = open_bundle(path)  # verified: the statistics are listed in SHA256SUMS
    assert f"classification/test_resnet/{OOD_FILE}" in (path / "SHA256SUMS").read_text()
    assert not (path / "classification" / "test_efficientnet" / OOD_FILE).exists()
    ood = bundle.info["classifiers"]["test_resnet"]["ood"]
    assert ood["usable"] and ood["percentile"] == 99.5 and ood["threshold_split"] == "validation"
    card = (path / "MODEL_CARD.md").read_text()
    assert f"`test_resnet`: distance threshold {ood['threshold']:.3f}, the 99.5th percentile of the 50" in card
    assert "`test_efficientnet`: check off" in card
    assert "images unlike the training images (the\n  out-of-distribution check below)" in card
    assert "out-of-distribution check off for test_efficientnet" in caplog.text  # said at bundle time too


def test_a_calibration_that_can_never_refer_is_warned_about_in_the_card():
    from dermpipe.bundle.card import card_warnings
    from dermpipe.ensemble.calibration import never_refers

    assert "at most 1/3" in never_refers(0.0, 3)
    assert "at most 1/4" in never_refers(0.25, 4)
    saturated = np.array([1.0] * 995 + [0.6] * 5)
    assert "saturates" in never_refers(0.9, 4, 0.05, saturated)
    assert never_refers(0.9, 4, 1.0, np.linspace(0.3, 1.0, 100)) == ""
    info = {"classes": ["a", "b", "c"], "calibration": {"refer": True, "refer_threshold": 0.0, "temperature": 0.05},
            "classifiers": {"x": {"ood": {"usable": True}}}}  # fmt: skip
    assert any("ever referred for low confidence" in w for w in card_warnings(info, {}))  # a vote of before
    assert card_warnings(info, {"never_refers": "the temperature saturates"}) == [
        "calibration: the temperature saturates"
    ]
    assert card_warnings(info, {"never_refers": ""}) == []


def test_a_root_without_statistics_still_predicts_with_the_check_off_in_the_log(tmp_path, caplog):
    from conftest import write_untrained_pipeline

    from dermpipe.pipeline.demo import write_photo_folder

    root = write_untrained_pipeline(tmp_path / "old", ["test_resnet"], ["nv", "mel", "bcc"])
    write_photo_folder(tmp_path / "photos", 2, 64, seed=0)
    items = [(p.stem, str(p)) for p in sorted((tmp_path / "photos").glob("photo_*.jpg"))]
    with caplog.at_level(logging.WARNING):
        predictor = _predictor({"segmentation_run": str(root / "seg"), "classification_root": str(root / "cls"),
                                "ensemble_run": str(root / "ens")}, tmp_path / "cache")  # fmt: skip
        reasons = _reasons(predictor, items)
    assert len(reasons) == 2 and not any(OOD_REASON in r for r in reasons.values())
    assert "out-of-distribution check: off (test_resnet: no ood.safetensors" in caplog.text


def test_a_whole_image_fallback_without_a_lesion_like_region_is_referred_no_lesion_found():
    from dermpipe.data.quality import QUALITY_NO_LESION
    from dermpipe.predict.predictor import JudgedCrop
    from dermpipe.predict.rows import refer_reason
    from dermpipe.segmentation.lesion import FALLBACK_ALL_BORDERS, FALLBACK_NO_LESION, FALLBACK_TOO_SMALL, LesionBox
    from dermpipe.segmentation.prediction import CropResult

    def crop(fallback: str, quality: tuple[str, ...] = (), cls=CropResult, **extra):
        box = LesionBox(0, 0, 64, 64, mask_area=0.001, fallback=fallback)
        pixels = np.zeros((32, 32, 3), np.uint8)
        return cls("x", "x.png", pixels, "k", box, np.zeros((32, 32), np.uint8), 64, 64, quality, **extra)

    confident = np.array([0.9, 0.05, 0.05])
    assert "no lesion found" in refer_reason(crop(FALLBACK_NO_LESION, (QUALITY_NO_LESION,)), confident, 0.5)
    assert "no lesion found (lesion implausibly small)" in refer_reason(crop(FALLBACK_TOO_SMALL), confident, 0.5)
    assert refer_reason(crop(FALLBACK_ALL_BORDERS), confident, 0.5) == ""  # a lesion filling the photo: judged
    assert refer_reason(crop(""), confident, 0.5) == ""
    judged = crop("", cls=JudgedCrop, unlike=f"{OOD_REASON} (feature distance 3.00 x the threshold)")
    assert refer_reason(judged, confident, 0.5) == f"{OOD_REASON} (feature distance 3.00 x the threshold)"


def test_a_vote_whose_refer_threshold_can_never_refer_says_so_at_vote_time(tmp_path, caplog):
    import json

    from test_ensemble import _args, synthetic_probs, write_tables

    from dermpipe.ensemble import vote

    rng = np.random.default_rng(0)
    root = tmp_path / "classification"
    for split, n in (("val", 240), ("test", 120)):  # backbones that are nearly always right: the argmax is enough
        labels, probs = synthetic_probs(n, rng, quality=(6.0, 6.0), noise=False)
        write_tables(root, split, labels, probs, backbones=("good_a", "good_b"))
    argv = _args(root, tmp_path / "vote", "--set", "evaluation.bootstrap=0")
    argv[argv.index("--backbones") + 1] = "good_a,good_b"
    with caplog.at_level(logging.WARNING), contextlib.redirect_stdout(io.StringIO()):
        assert vote.main(argv) == 0
    summary = json.loads((tmp_path / "vote" / "summary.json").read_text())
    assert summary["refer_threshold"] == 0.0  # the argmax alone reaches the target sensitivity: nothing is referred
    assert "no image is ever referred for low confidence" in summary["never_refers"]
    assert "calibration: the refer threshold 0 is at most 1/4" in caplog.text


@pytest.mark.e2e
def test_an_onnx_export_without_the_features_output_predicts_with_the_check_off_for_it(trained, tmp_path, caplog):
    import dataclasses
    import shutil
    from types import SimpleNamespace

    from dermpipe.bundle.onnx_export import export_network, load_network

    root = tmp_path / "root"
    shutil.copytree(trained["root"], root, ignore=shutil.ignore_patterns("cache"))
    weights = "classification/test_resnet/best.safetensors"
    net = load_network(SimpleNamespace(path=root), "classification", weights, weights_digest(root / weights))
    export_network(dataclasses.replace(net, features=False), (root / weights).with_suffix(".onnx"))  # as before
    items = list(_junk(tmp_path / "junk").items())
    with caplog.at_level(logging.WARNING):
        predictor = _predictor(_root_stages(root), tmp_path / "cache", "onnxruntime")
        first = _reasons(predictor, items)
    assert "out-of-distribution check off for test_resnet: its ONNX export gives no features" in caplog.text
    resnet = predictor.classifiers[0]
    assert resnet.name == "test_resnet" and resnet.ood is None and predictor.classifiers[1].ood is not None
    computed = resnet.cache.computed
    assert _reasons(predictor, items) == first  # the other backbone's check still judges, the same way
    assert resnet.cache.computed == computed  # its entries, kept without features, are reused, not computed again
