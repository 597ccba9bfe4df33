"""Pretrained weights without the hub: a download that cannot happen (offline switch, or no answer from the host)
fails at once with the project's message; weights in the local cache and local weights files still load. And the
head-only epochs that follow from the weights (train.freeze_epochs auto)."""

import json
import socket
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from safetensors.torch import save_file

from dermpipe.classification.backbones import build_classifier
from dermpipe.classification.config import ClassificationConfig, ClsModelConfig, ClsTrainConfig, effective_batchnorm
from dermpipe.classification.epochs import ClassificationStage
from dermpipe.classification.training import effective_freeze_epochs
from dermpipe.configs.loader import default_config_path, load_config
from dermpipe.engine import hub
from dermpipe.engine.checkpoint import CheckpointError
from dermpipe.segmentation.config import SegModelConfig
from dermpipe.segmentation.model import ModelBuildError, build_unet

TINY = "test_resnet"  # timm's tiny test network, with weights on the hub (timm/test_resnet.r160_in1k)
SMP_ENCODER = "mobilenet_v2"  # a small smp encoder whose ImageNet weights live in an smp-hub repository
SMALL_DECODER = (16, 8, 8, 8, 8)
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def closed_port() -> int:
    """A local port nobody listens on: a connection there is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """Empty huggingface_hub and torch hub caches, no offline switch nor proxy, and a hub endpoint (what the probe
    connects to for hub-hosted weights) at a local port that refuses connections. Returns that endpoint."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch"))
    for name in (*hub.OFFLINE_VARIABLES, *PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    return endpoint


def _seg(encoder, weights):
    return SegModelConfig(encoder=encoder, encoder_weights=weights, decoder_channels=SMALL_DECODER)


def _hub_snapshot(repo_id: str, revision: str, files: dict) -> None:
    """Files of ``repo_id`` at commit ``revision`` in huggingface_hub's cache, as a finished download leaves them
    (``refs/main`` names the commit)."""
    repo = Path(huggingface_hub.constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for name, content in files.items():
        if isinstance(content, dict):
            save_file(content, str(snapshot / name))
        else:
            (snapshot / name).write_text(content)


def _tiny_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in timm.create_model(TINY).state_dict().items()}


def _smp_encoder_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return smp.encoders.get_encoder(SMP_ENCODER, weights=None).state_dict()


def _assert_loaded(module: torch.nn.Module, state: dict) -> None:
    """Every weight of ``module`` that ``state`` names holds ``state``'s value (and there are some)."""
    own = module.state_dict()
    shared = [k for k in own if k in state and own[k].is_floating_point()]
    assert len(shared) > 10
    for k in shared:
        assert torch.equal(own[k], state[k]), k


# --- fail at once ---


@pytest.mark.parametrize("switch", hub.OFFLINE_VARIABLES)
def test_offline_switch_fails_at_once_without_probing(no_hub, monkeypatch, switch):
    monkeypatch.setenv(switch, "1")
    monkeypatch.setattr(hub, "probe", lambda *a, **k: pytest.fail("probed the hub although offline"))
    with pytest.raises(CheckpointError) as e:
        build_classifier(TINY, 2, pretrained=True)
    assert str(e.value) == (
        f"could not load pretrained weights for {TINY} from timm's download ({switch}=1 is set, and the weights are "
        "not in the local cache); set model.pretrained to false, or to a local weights file made for this model"
    )
    for encoder in (SMP_ENCODER, f"tu-{TINY}"):
        with pytest.raises(ModelBuildError) as e:
            build_unet(_seg(encoder, "imagenet"))
        assert str(e.value) == (
            f"cannot get imagenet weights for encoder {encoder} ({switch}=1 is set, and the weights are not in the "
            "local cache); offline? pass a local file with --set model.encoder_weights=PATH or train from scratch "
            "with --set model.encoder_weights=null"
        )


def test_unreachable_hub_fails_at_once_with_the_projects_message(no_hub):
    port = no_hub.rsplit(":", 1)[1]
    with pytest.raises(CheckpointError, match=rf"from timm's download \(cannot connect to 127\.0\.0\.1:{port}: .*, "
                       r"and the weights are not in the local cache\); set model\.pretrained to false"):  # fmt: skip
        build_classifier(TINY, 2, pretrained=True)
    for encoder in (SMP_ENCODER, f"tu-{TINY}"):
        with pytest.raises(ModelBuildError, match=rf"cannot get imagenet weights for encoder {encoder} \(cannot "
                           rf"connect to 127\.0\.0\.1:{port}: .*\); offline\? pass a local file"):  # fmt: skip
            build_unet(_seg(encoder, "imagenet"))


def test_probe_reports_a_refused_or_silent_host_and_goes_through_the_proxy(no_hub, monkeypatch):
    port = closed_port()
    assert hub.probe(f"http://127.0.0.1:{port}/w.pth").startswith(f"cannot connect to 127.0.0.1:{port}")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert hub.probe(f"https://127.0.0.1:{server.getsockname()[1]}/w.pth") is None
        # behind a proxy the connection goes to the proxy, whatever the weights' host
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.probe("https://unreachable.invalid/w.pth") is None
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
    assert "the proxy for huggingface.co" in hub.probe("https://huggingface.co/w.pth")

    def silent(*args, **kwargs):
        time.sleep(1)
        raise OSError("late")

    monkeypatch.setattr(socket, "create_connection", silent)
    assert hub.probe("https://example.org/w.pth", timeout=0.2).endswith("gave no answer within 0.2 s")


def test_timm_weights_come_from_the_hub_or_a_url_and_a_cached_url_download_needs_no_network(no_hub, tmp_path):
    download = hub.timm_download(TINY)
    assert download.hf and download.cached is None
    assert download.url == f"{no_hub}/timm/test_resnet.r160_in1k/resolve/main/model.safetensors"
    assert hub.timm_download("legacy_xception").url.startswith("https://github.com/")  # no hub copy: timm's URL
    url = f"{no_hub}/releases/weights-123.pth"
    assert hub.unreachable(hub.url_download(url)).startswith("cannot connect to 127.0.0.1")
    (tmp_path / "torch" / "checkpoints").mkdir(parents=True)
    (tmp_path / "torch" / "checkpoints" / "weights-123.pth").write_bytes(b"cached")
    cached = hub.url_download(url)
    assert cached.cached == str(tmp_path / "torch" / "checkpoints" / "weights-123.pth")
    assert hub.unreachable(cached) is None


# --- the local cache works offline ---


def test_cached_hub_weights_load_offline_without_a_probe(no_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "probe", lambda *a, **k: pytest.fail("probed the hub for cached weights"))
    state = _tiny_state(seed=1)
    _hub_snapshot("timm/test_resnet.r160_in1k", "a" * 40, {"model.safetensors": state})
    model = build_classifier(TINY, 2, pretrained=True)
    _assert_loaded(model.backbone, state)
    unet = build_unet(_seg(f"tu-{TINY}", "imagenet"))
    _assert_loaded(unet.encoder.model, state)
    # an smp encoder's weights: smp asks for config.json and model.safetensors at a pinned commit
    settings = smp.encoders.encoders[SMP_ENCODER]["pretrained_settings"]["imagenet"]
    encoder_state = _smp_encoder_state(seed=2)
    _hub_snapshot(
        settings["repo_id"], settings["revision"], {"config.json": json.dumps({}), "model.safetensors": encoder_state}
    )
    _assert_loaded(build_unet(_seg(SMP_ENCODER, "imagenet")).encoder, encoder_state)


def test_half_cached_smp_weights_still_need_the_hub(no_hub):
    settings = smp.encoders.encoders[SMP_ENCODER]["pretrained_settings"]["imagenet"]
    _hub_snapshot(settings["repo_id"], settings["revision"], {"model.safetensors": _smp_encoder_state()})
    with pytest.raises(ModelBuildError, match="cannot connect to 127.0.0.1"):
        build_unet(_seg(SMP_ENCODER, "imagenet"))


# --- local weights files ---


def _save(state: dict, path, kind: str):
    if kind == "safetensors":
        save_file(state, str(path))
    elif kind == "pth":
        torch.save(state, path)
    else:  # a training checkpoint: the tensors under "state_dict"
        torch.save({"state_dict": state, "epoch": 3}, path)
    return str(path)


@pytest.mark.parametrize("kind, suffix", [("safetensors", ".safetensors"), ("pth", ".pth"), ("wrapped", ".pt")])
def test_local_weights_files_load_for_timm_and_smp_encoders_offline(no_hub, monkeypatch, tmp_path, kind, suffix):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "probe", lambda *a, **k: pytest.fail("probed the hub for a local file"))
    state = _tiny_state(seed=3)
    timm_file = _save(state, tmp_path / f"tiny{suffix}", kind)
    _assert_loaded(build_classifier(TINY, 2, pretrained=timm_file).backbone, state)
    # a tu- encoder takes the same plain timm file: timm's loader, not smp's "model."-prefixed keys
    _assert_loaded(build_unet(_seg(f"tu-{TINY}", timm_file)).encoder.model, state)
    encoder_state = _smp_encoder_state(seed=4)
    smp_file = _save(encoder_state, tmp_path / f"encoder{suffix}", kind)
    _assert_loaded(build_unet(_seg(SMP_ENCODER, smp_file)).encoder, encoder_state)


def test_local_files_that_fit_nothing_are_refused(no_hub, tmp_path):
    timm_file = _save(_tiny_state(), tmp_path / "tiny.safetensors", "safetensors")
    with pytest.raises(ModelBuildError, match="fits none of the MobileNetV2Encoder's"):
        build_unet(_seg(SMP_ENCODER, timm_file))
    encoder_file = _save(_smp_encoder_state(), tmp_path / "encoder.safetensors", "safetensors")
    with pytest.raises(ModelBuildError, match=f"cannot load encoder tu-{TINY} weights from"):
        build_unet(_seg(f"tu-{TINY}", encoder_file))
    with pytest.raises(CheckpointError, match=f"could not load pretrained weights for {TINY} from .*encoder"):
        build_classifier(TINY, 2, pretrained=encoder_file)
    with pytest.raises(ModelBuildError, match="not found"):
        build_unet(_seg(f"tu-{TINY}", str(tmp_path / "missing.pth")))


# --- train.freeze_epochs auto ---


def _cls(pretrained, freeze_epochs=None, epochs=5):
    return ClassificationConfig(
        model=ClsModelConfig(backbone=TINY, pretrained=pretrained),
        train=ClsTrainConfig(epochs=epochs, freeze_epochs=freeze_epochs),
    )


def test_freeze_epochs_auto_is_one_with_pretrained_weights_and_zero_from_scratch():
    assert ClsTrainConfig().freeze_epochs is None
    assert load_config(ClassificationConfig, default_config_path("classification")).train.freeze_epochs is None
    assert effective_freeze_epochs(_cls(False)) == 0
    assert effective_freeze_epochs(_cls(True)) == 1
    assert effective_freeze_epochs(_cls("/weights/resnet50.safetensors")) == 1
    # an explicit number is honoured either way
    assert effective_freeze_epochs(_cls(False, freeze_epochs=2)) == 2
    assert effective_freeze_epochs(_cls(True, freeze_epochs=0)) == 0
    with pytest.raises(ValueError, match="or null"):
        ClsTrainConfig(epochs=2, freeze_epochs=3)


@pytest.mark.parametrize("pretrained, phases", [(False, ["all", "all"]), (True, ["head", "all"])])
def test_the_training_stage_freezes_the_backbone_for_the_auto_epochs(pretrained, phases):
    stage = object.__new__(ClassificationStage)  # start_epoch needs only the config and the model
    stage.cfg, stage.model = _cls(pretrained), build_classifier(TINY, 2, pretrained=False)
    stage.batchnorm = effective_batchnorm(stage.cfg)
    assert [stage.start_epoch(epoch)["phase"] for epoch in range(2)] == phases
    assert not stage.model.backbone_frozen
