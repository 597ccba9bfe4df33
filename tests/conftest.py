"""Shared test helpers."""

import pytest
import torch


@pytest.fixture
def interrupt_epoch(monkeypatch):
    """``interrupt_epoch(n)``: the n-th epoch of the engine's training loop raises KeyboardInterrupt, as Ctrl-C in that
    epoch would; earlier epochs train as usual. Returns a function that restores the real one."""
    from dermpipe.engine import loop as module

    def install(n: int):
        real, calls = module.train_one_epoch, []

        def interrupted(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(module, "train_one_epoch", interrupted)
        return lambda: monkeypatch.setattr(module, "train_one_epoch", real)

    return install


@pytest.fixture
def one_thread():
    """One torch thread for the test: on two shared cores, several times faster than two threads fighting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_untrained_pipeline(root, backbones, classes, folders=("seg", "cls", "ens")):
    """Untrained but complete stage folders under ``root`` (``seg``, ``cls/<backbone>``, ``ens``; ``folders`` names
    them otherwise): what the predictor loads is exercised, not what the models learned."""
    from dermpipe.classification.backbones import build_classifier, checkpoint_metadata
    from dermpipe.engine.checkpoint import save_checkpoint
    from dermpipe.engine.run import save_config
    from dermpipe.ensemble.meta import LocallyConnectedVote, save_meta
    from dermpipe.segmentation.config import SegDataConfig, SegmentationConfig, SegModelConfig, SegPredictConfig
    from dermpipe.segmentation.model import build_unet, save_unet

    torch.manual_seed(0)
    seg_model = SegModelConfig(encoder="tu-test_resnet", encoder_weights=None, decoder_channels=(16, 8, 8, 8, 8))
    seg_cfg = SegmentationConfig(
        data=SegDataConfig(image_size=32),
        model=seg_model,
        predict=SegPredictConfig(crop_size=32, tta=False, batch_size=4),
    )
    seg, cls, ens = (root / f for f in folders)
    save_unet(seg / "best.safetensors", build_unet(seg_model), seg_model, 32, "test")
    save_config(seg_cfg, seg / "config.yaml")
    for name in backbones:
        model = build_classifier(name, len(classes), False)
        model.input_size = 32
        save_checkpoint(cls / name / "best.safetensors", model, checkpoint_metadata(model, classes))
    vote = LocallyConnectedVote(len(backbones), len(classes), 4)
    save_meta(ens / "meta.safetensors", vote, classes, list(backbones),
              {"temperature": 1.5, "refer_threshold": 0.5, "refer_class": "mel"})  # fmt: skip
    return root


def write_untrained_bundle(folder, backbones, classes, name="bundle"):
    """A verified bundle (``folder/name``, as ``dermpipe bundle`` writes it) of an untrained pipeline."""
    from dermpipe.ensemble.bundle import write_bundle

    root = write_untrained_pipeline(folder / "root", backbones, classes, ("segmentation", "classification", "ensemble"))
    return write_bundle(root, folder / name).path
