"""Shared test helpers."""

import contextlib
import logging
import re
import signal
import subprocess
import sys

import pytest
import torch

# The slowest files (pytest --durations on a 2-core machine), first: `make test` runs files on several workers
# (--dist loadfile --no-loadscope-reorder), and the longest file starting last would be the whole run's tail.
SLOWEST_FIRST = ("test_quickstart.py", "test_distributed.py", "test_onnx.py", "test_ensemble.py", "test_api.py",
                 "test_benchmarks.py", "test_packaged_weights.py", "test_kills.py", "test_pipeline_run.py")  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order kept


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


@pytest.fixture(autouse=True)
def drop_log_handlers():
    """The log handlers a stage called in-process added (``setup_logging``) go with the test: a handler left on a test's
    captured stderr, closed after it, would fail the next test's first log line."""
    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_dermpipe", False):
            root.removeHandler(handler)
            handler.close()


@pytest.fixture(scope="session", autouse=True)
def user_cache_folder(tmp_path_factory):
    """The user's cache folder (platformdirs: ``XDG_CACHE_HOME``), where prediction from a bundle caches without a
    run root, is the test session's own: no test reads or fills the real one (servers started inherit it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("user-cache")))
        yield


@pytest.fixture
def one_thread():
    """One torch thread for the test: on two shared cores, several times faster than two threads fighting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_untrained_pipeline(root, backbones, classes, folders=("seg", "cls", "ens"), input_size=32):
    """Untrained but complete stage folders under ``root`` (``seg``, ``cls/<backbone>``, ``ens``; ``folders`` names
    them otherwise): what the predictor loads is exercised, not what the models learned. The classifiers run at
    ``input_size`` (at least the backbone's smallest, e.g. 75 px for the Inception family), the U-Net at 32 px."""
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
    # ImageNet normalisation, as these untrained stages have always had (their masks depend on it)
    save_unet(seg / "best.safetensors", build_unet(seg_model), seg_model, 32, "test",
              normalisation=((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))  # fmt: skip
    save_config(seg_cfg, seg / "config.yaml")
    for name in backbones:
        model = build_classifier(name, len(classes), False)
        model.input_size = max(input_size, model.min_input_size)
        save_checkpoint(cls / name / "best.safetensors", model, checkpoint_metadata(model, classes))
    vote = LocallyConnectedVote(len(backbones), len(classes), 4)
    save_meta(ens / "meta.safetensors", vote, classes, list(backbones),
              {"temperature": 1.5, "refer_threshold": 0.5, "refer_class": "mel"})  # fmt: skip
    return root


def write_untrained_bundle(folder, backbones, classes, name="bundle", input_size=32):
    """A verified bundle (``folder/name``, as ``dermpipe bundle`` writes it) of an untrained pipeline (classifiers
    at ``input_size``, as ``write_untrained_pipeline``)."""
    from dermpipe.bundle.write import write_bundle

    layout = ("segmentation", "classification", "ensemble")
    root = write_untrained_pipeline(folder / "root", backbones, classes, layout, input_size)
    write_lineages(root, backbones)
    return write_bundle(root, folder / name).path


def write_lineages(root, backbones):
    """Each stage's lineage.json in an untrained pipeline under ``root`` (the run root's layout)."""
    from dermpipe.engine.lineage import record_hand_made

    return record_hand_made(root, backbones)


@contextlib.contextmanager
def served(*args):
    """``dermpipe serve ARGS --port 0`` running in a subprocess on 127.0.0.1: yields ``(base url, process)``; stopped
    with SIGINT (as Ctrl-C stops it) at the end, and its exit status checked."""
    command = [sys.executable, "-m", "dermpipe.serve.main", *map(str, args), "--port", "0"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen, match = "", None
        for line in iter(server.stdout.readline, ""):  # warnings (a check that is off) may come before the address
            seen += line
            if match := re.search(r"http://127\.0\.0\.1:(\d+)/", line):
                break
        assert match, seen + server.stdout.read() if server.poll() is not None else seen
        yield f"http://127.0.0.1:{match.group(1)}", server
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert server.returncode == 0, server.stdout.read()


def write_photos(folder, n, seed=0, classes=("nv", "mel", "bcc"), size=64):
    """``n`` synthetic photos ``photo_<seed>_<i>.png`` in ``folder`` (made when missing): the names differ per seed,
    so two inputs never share a picture's name. Returns ``folder``."""
    import cv2
    import numpy as np

    from dermpipe.data.generator import make_sample

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        image, _ = make_sample(rng, classes[i % len(classes)], size)
        cv2.imwrite(str(folder / f"photo_{seed}_{i}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return folder
