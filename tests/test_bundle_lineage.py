"""A bundle refuses a broken chain (a stale stage, a vote or classifiers of other models than those it packs), every
metric block in it names the sha256 of the model(s) it scored, and bundle.json never says one thing while the
weights do another: an edit there is refused at load, never silently ignored."""

import hashlib
import json
import re

import pytest
import torch
from conftest import write_lineages, write_untrained_pipeline

from dermpipe.bundle import make_bundle
from dermpipe.bundle.store import BundleError, open_bundle
from dermpipe.bundle.write import write_bundle
from dermpipe.engine.lineage import file_sha256, short, write_lineage

BACKBONES = ["test_resnet", "test_efficientnet"]
CLASSES = ["mel", "nv", "bkl"]
LAYOUT = ("segmentation", "classification", "ensemble")


def _resave(path, **metadata):
    """Rewrite a checkpoint with the same tensors and ``metadata`` items added (other bytes, so another digest)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        raw = dict(f.metadata())
    raw.update({k: json.dumps(v) for k, v in metadata.items()})
    save_file(load_file(str(path)), str(path), metadata=raw)


def _root(tmp_path, crops=True):
    """A finished, untrained run root with the metric files each stage writes and every stage's lineage; with
    ``crops``, a crops stage made by its U-Net, on whose crops the classifiers were trained (as their checkpoints
    record)."""
    root = write_untrained_pipeline(tmp_path / "root", BACKBONES, CLASSES, LAYOUT)
    seg, cls, ens = (root / f for f in LAYOUT)
    (seg / "metrics.csv").write_text("epoch,val_jaccard,val_dice\n1,0.61,0.70\n2,0.74,0.81\n3,0.69,0.77\n")
    for i, b in enumerate(BACKBONES):
        report = {"balanced_accuracy": 0.5 + i / 10, "accuracy": 0.6, "macro_f1": 0.4, "macro_auc": 0.7, "n_images": 9}
        (cls / b / "metrics_test.json").write_text(json.dumps(report))
    methods = [*BACKBONES, "best_single", "mean_vote", "majority_vote", "logistic_stacking", "meta_network"]
    summary = {
        "n_test": 9,
        "best_single": BACKBONES[1],
        "methods": [{"method": m, "balanced_accuracy": 0.5, "macro_auc": 0.6} for m in methods],
        "referral_test": {"referred_fraction": 0.2, "sensitivity_with_referral": 1.0},
        "target_sensitivity": 0.95,
        "target_missed": False,
    }
    (ens / "summary.json").write_text(json.dumps(summary))
    if crops:
        unet = file_sha256(seg / "best.safetensors")
        for b in BACKBONES:
            _resave(cls / b / "best.safetensors", crops={"margin": 0.1, "crop_size": 32, "segmentation_weights": unet})
        (root / "crops").mkdir()
        (root / "crops" / "crops.csv").write_text("image_id,crop_path\n")
        crops_digest = file_sha256(root / "crops" / "crops.csv")
        write_lineage(root / "crops", "crops", {"unet": unet}, {"crops_manifest": crops_digest})
    write_lineages(root, BACKBONES)
    if crops:
        for b in BACKBONES:
            weights = file_sha256(cls / b / "best.safetensors")
            write_lineage(cls / b, "classification", {"crops_manifest": crops_digest}, {"weights": weights})
    return root


def _bundle(tmp_path, **kwargs):
    return write_bundle(_root(tmp_path, **kwargs), tmp_path / "bundle")


def _resign(bundle):
    """Rewrite SHA256SUMS over the bundle's present files, as someone editing a bundle by hand would."""
    lines = [
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(bundle).as_posix()}\n"
        for p in sorted(bundle.rglob("*"))
        if p.is_file() and p.name != "SHA256SUMS"
    ]
    (bundle / "SHA256SUMS").write_text("".join(lines))


def _edit_info(bundle, edit):
    info = json.loads((bundle / "bundle.json").read_text())
    edit(info)
    (bundle / "bundle.json").write_text(json.dumps(info, indent=2) + "\n")


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _unet_retrained(root):
    """The U-Net trained again (other weights) and its lineage recorded, as segmentation training leaves it; the crops
    and the classifiers are those of the old U-Net."""
    from dermpipe.segmentation.config import SegModelConfig
    from dermpipe.segmentation.model import build_unet, save_unet

    seg = root / "segmentation"
    torch.manual_seed(1)
    model = SegModelConfig(encoder="tu-test_resnet", encoder_weights=None, decoder_channels=(16, 8, 8, 8, 8))
    save_unet(seg / "best.safetensors", build_unet(model), model, 32, "test")
    write_lineage(seg, "segmentation", {}, {"weights": file_sha256(seg / "best.safetensors")})


def test_a_whole_root_is_bundled_with_every_metric_naming_its_model(tmp_path):
    bundle = _bundle(tmp_path)
    bundle_dir = bundle.path
    sums = dict(reversed(line.split("  ")) for line in (bundle_dir / "SHA256SUMS").read_text().splitlines())
    unet, meta = sums["segmentation/best.safetensors"], sums["ensemble/meta.safetensors"]
    models = {b: sums[f"classification/{b}/best.safetensors"] for b in BACKBONES}
    scores = bundle.info["metrics"]
    assert scores["segmentation"] == {"epoch": "2", "val_jaccard": 0.74, "val_dice": 0.81, "model_digest": unet}
    assert {b: scores["classifiers"][b]["model_digest"] for b in BACKBONES} == models
    assert scores["classifiers"][BACKBONES[1]]["balanced_accuracy"] == pytest.approx(0.6)
    assert scores["vote"]["model_digests"] == {"meta": meta, **models}
    rows = {r["method"]: r["model_digests"] for r in scores["vote"]["methods"]}
    assert rows[BACKBONES[0]] == {BACKBONES[0]: models[BACKBONES[0]]}
    assert rows["best_single"] == {BACKBONES[1]: models[BACKBONES[1]]}
    assert rows["mean_vote"] == models and rows["meta_network"] == {"meta": meta, **models}
    assert bundle.info["calibration"]["model_digest"] == meta
    assert bundle.info["crops"]["segmentation_weights"] == unet  # which U-Net made the training crops


def test_a_root_whose_unet_was_retrained_after_the_classifiers_is_refused_naming_the_stage(tmp_path, capsys):
    root = _root(tmp_path)
    _unet_retrained(root)
    before = _files(root)
    assert make_bundle.main(["--root", str(root), "--out", str(tmp_path / "bundle")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {root} cannot be bundled: ")
    assert "crops was made from the U-Net" in err and "rerun `dermpipe run`" in err
    for b in BACKBONES:  # the classifiers too, by their own record of the U-Net behind their crops
        assert f"classification/{b} was trained on crops of U-Net " in err
    assert not (tmp_path / "bundle").exists() and not list(tmp_path.glob(".bundle*"))
    assert _files(root) == before


def test_classifiers_trained_on_crops_of_another_unet_are_refused_even_when_the_lineage_agrees(tmp_path, capsys):
    """The direct check: the classifiers' own record of the U-Net behind their crops, whatever lineage.json says."""
    root = _root(tmp_path)
    _unet_retrained(root)
    write_lineage(root / "crops", "crops", {"unet": file_sha256(root / "segmentation" / "best.safetensors")},
                  {"crops_manifest": file_sha256(root / "crops" / "crops.csv")})  # fmt: skip
    assert make_bundle.main(["--root", str(root), "--out", str(tmp_path / "bundle")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    for b in BACKBONES:
        assert f"classification/{b} was trained on crops of U-Net " in err
    assert "make the crops again and retrain it" in err and not (tmp_path / "bundle").exists()


def test_a_vote_fitted_on_other_classifier_weights_is_refused(tmp_path, capsys):
    root = _root(tmp_path, crops=False)
    weights = root / "classification" / BACKBONES[0] / "best.safetensors"
    _resave(weights, epoch=9)  # the classifier trained again after the vote; its own lineage updated
    write_lineage(weights.parent, "classification", {}, {"weights": file_sha256(weights)})
    assert make_bundle.main(["--root", str(root), "--out", str(tmp_path / "bundle")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the {BACKBONES[0]} classifier" in err and "ensemble" in err


def test_a_root_without_lineage_is_refused_saying_how_to_refresh_it(tmp_path, capsys):
    root = _root(tmp_path, crops=False)
    (root / "segmentation" / "lineage.json").unlink()
    assert make_bundle.main(["--root", str(root), "--out", str(tmp_path / "bundle")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "segmentation has no lineage record" in err and "dermpipe run --force" in err


def test_a_metric_digest_that_is_not_the_bundled_weights_is_refused_at_load(tmp_path):
    bundle = _bundle(tmp_path, crops=False).path
    open_bundle(bundle)
    other = "0" * 64
    _edit_info(bundle, lambda info: info["metrics"]["segmentation"].update(model_digest=other))
    with pytest.raises(BundleError, match="bundle.json does not match its sha256"):
        open_bundle(bundle)  # an edit alone: SHA256SUMS covers bundle.json
    _resign(bundle)
    with pytest.raises(BundleError) as refused:
        open_bundle(bundle)
    message = str(refused.value)
    assert "bundle.json metrics.segmentation.model_digest names model" in message and other[:20] in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda info: info["calibration"].update(refer_threshold=0.9), "calibration.refer_threshold"),
        (lambda info: info["calibration"].update(temperature=1.0), "calibration.temperature"),
        (lambda info: info.update(classes=list(reversed(info["classes"]))), "classes[0]"),
        (
            lambda info: info["classifiers"][BACKBONES[0]].update(input_size=64),
            f"classifiers.{BACKBONES[0]}.input_size",
        ),
        (lambda info: info["crops"].update(margin=0.3), "crops.margin"),
        (
            lambda info: info["metrics"]["vote"]["methods"][0].update(balanced_accuracy=0.99),
            "metrics.vote.methods[0].balanced_accuracy",
        ),
        (lambda info: info["metrics"]["vote"]["model_digests"].pop("meta"), "metrics.vote.model_digests.meta"),
        (lambda info: info.update(refer_threshold=0.9), "holds refer_threshold, which no dermpipe bundle has"),
    ],
)
def test_an_edited_bundle_json_value_is_refused_not_ignored(tmp_path, edit, key):
    """Prediction reads classes, preprocessing, crops and calibration from the weights: a bundle.json that says
    otherwise (even with SHA256SUMS rewritten to match) is refused, naming the value."""
    bundle = _bundle(tmp_path).path
    _edit_info(bundle, edit)
    _resign(bundle)
    with pytest.raises(BundleError, match=re.escape(f"bundle.json {key} ")):
        open_bundle(bundle)


def test_an_edited_bundle_is_refused_by_dermpipe_predict_in_one_line(tmp_path, capsys):
    from dermpipe.predict import cli as predict

    bundle = _bundle(tmp_path, crops=False).path
    _edit_info(bundle, lambda info: info["calibration"].update(refer_threshold=0.0))
    _resign(bundle)
    (tmp_path / "photos").mkdir()
    argv = ["--model", str(bundle), "--input", str(tmp_path / "photos"), "--out", str(tmp_path / "out")]
    assert predict.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bundle.json calibration.refer_threshold is 0.0 but the bundled files say" in err
    assert not (tmp_path / "out").exists()


def test_a_version_1_bundle_is_refused(tmp_path):
    bundle = _bundle(tmp_path, crops=False).path
    _edit_info(bundle, lambda info: info.update(format_version=1))
    _resign(bundle)
    with pytest.raises(BundleError, match="made before its metrics named the models they scored"):
        open_bundle(bundle)


def test_the_card_and_v1_model_show_the_digests(tmp_path):
    from fastapi.testclient import TestClient

    from dermpipe.serve.app import create_app
    from dermpipe.serve.main import build_parser, open_service

    bundle = _bundle(tmp_path, crops=False)
    info = bundle.info
    scores = info["metrics"]
    card = (bundle.path / "MODEL_CARD.md").read_text()
    assert f"Dice 0.810 (U-Net {short(scores['segmentation']['model_digest'])})" in card
    meta = scores["vote"]["model_digests"]["meta"]
    models = {b: scores["classifiers"][b]["model_digest"] for b in BACKBONES}
    assert f"temperature 1.500 (vote\n  {short(meta)})" in card
    for b in BACKBONES:
        assert f"test balanced accuracy {scores['classifiers'][b]['balanced_accuracy']:.3f} (weights " \
               f"{short(models[b])})" in card  # fmt: skip
    lines = {line.split(" | ")[0].lstrip("| "): line for line in card.splitlines() if line.startswith("| ")}
    assert lines[BACKBONES[0]].endswith(f"| {BACKBONES[0]} {short(models[BACKBONES[0]])} |")
    assert lines["best_single"].endswith(f"| {BACKBONES[1]} {short(models[BACKBONES[1]])} |")
    assert f"vote {short(meta)}, " in lines["meta_network"]

    args = ["--model", str(bundle.path), "--device", "cpu", "--root", str(tmp_path / "serve-root"), "--no-gradcam"]
    service, limits = open_service(build_parser().parse_args(args))
    try:
        with TestClient(create_app(service, limits)) as client:
            served = client.get("/v1/model").json()
    finally:
        service.close()
    assert served["scores"] == scores
    assert served["metrics"]["model_digests"] == {"meta": meta, **models}
    assert all(row["model_digests"] for row in served["methods"])
    assert served["calibration"]["model_digest"] == meta
