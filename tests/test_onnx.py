"""ONNX export of a bundle (``dermpipe export``) and ONNX Runtime as the engine of ``dermpipe predict``.

The export writes checked ONNX files with their metadata beside the weights, keeps the bundle's identity, is atomic
(a failure leaves the bundle byte for byte) and idempotent; under ``--engine onnxruntime`` the same pipeline gives the
probabilities PyTorch gives, for the smallest untrained member of every default backbone family, and never reuses
PyTorch's cache entries.
"""

import contextlib
import csv
import hashlib
import importlib.util
import io
import json
import pickle
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import write_untrained_bundle

from dermpipe import __version__
from dermpipe.bundle import onnx_export
from dermpipe.bundle.store import CHECKSUMS, open_bundle
from dermpipe.classification.backbones import load_classifier
from dermpipe.configs.schema import RunConfig
from dermpipe.data.loaders import resize_square
from dermpipe.data.reading import read_image
from dermpipe.engine.checkpoint import read_metadata
from dermpipe.engine.onnx_runtime import OnnxModelError, OnnxModule, open_onnx
from dermpipe.ensemble.meta import load_meta
from dermpipe.pipeline.demo import write_photo_folder
from dermpipe.predict import cli as predict_script
from dermpipe.predict import export as export_script
from dermpipe.predict.config import PredictConfig
from dermpipe.predict.predictor import EnsemblePredictor
from dermpipe.segmentation.model import load_unet
from dermpipe.segmentation.prediction import predict_probabilities

CLASSES = ["nv", "mel", "bcc"]
# the smallest timm member of each default backbone family (classification/backbones.py DEFAULT_BACKBONES: resnet50,
# densenet169, inception_v3, inception_resnet_v2, xception); "xception" is the registry's legacy_xception
FAMILIES = ["resnet18", "densenet121", "inception_v3", "inception_resnet_v2", "xception"]
SIZE = 75  # the smallest input the Inception family takes
WEIGHTS = ["segmentation/best.safetensors", *(f"classification/{b}/best.safetensors" for b in FAMILIES),
           "ensemble/meta.safetensors"]  # fmt: skip
PARITY = 1e-4


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One torch thread: on two shared cores, steadier and faster than two threads fighting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(main, argv):
    """(exit status, stdout, stderr) of a command's ``main``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _snapshot(bundle: Path) -> dict:
    """Every file of the bundle with its bytes, and every entry beside it (no temporary left behind)."""
    files = {p.relative_to(bundle).as_posix(): p.read_bytes() for p in sorted(bundle.rglob("*")) if p.is_file()}
    return {"files": files, "beside": sorted(p.name for p in bundle.parent.iterdir())}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """A bundle of the five families at 75 px, exported once: (bundle, its identity and SHA256SUMS before, output)."""
    folder = tmp_path_factory.mktemp("families")
    bundle = write_untrained_bundle(folder, FAMILIES, CLASSES, input_size=SIZE)
    before = open_bundle(bundle)
    sums = (bundle / CHECKSUMS).read_bytes()
    code, out, err = _run(export_script.main, ["--model", str(bundle), "--format", "onnx"])
    assert code == 0, err
    return SimpleNamespace(path=bundle, identity=before.identity, sums=sums, out=out)


@pytest.fixture
def small(tmp_path):
    """A fresh bundle of one tiny backbone, not exported."""
    return write_untrained_bundle(tmp_path, ["test_resnet"], CLASSES)


def _torch_network(path: Path):
    """The PyTorch module of a bundle's weights file, as prediction loads it."""
    if path.parent.parent.name == "classification":
        return load_classifier(path)[0]
    return (load_unet if path.parent.name == "segmentation" else load_meta)(path)[0]


@pytest.mark.e2e
def test_export_writes_each_network_beside_its_weights_checked_with_its_metadata(families):
    assert families.out.count("\n") == 1 and "wrote 7 ONNX files" in families.out
    for weights in WEIGHTS:
        path = (families.path / weights).with_suffix(".onnx")
        onnx.checker.check_model(str(path), full_check=True)
        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        meta = read_metadata(families.path / weights)
        assert props["source_sha256"] == hashlib.sha256((families.path / weights).read_bytes()).hexdigest()
        assert props["source"] == weights and props["dermpipe_version"] == __version__
        assert "N x" in props["input"] and "logits N x" in props["output"]
        if weights.startswith("ensemble"):
            assert json.loads(props["classes"]) == CLASSES and json.loads(props["backbones"]) == FAMILIES
            assert json.loads(props["input_size"]) == [len(FAMILIES), len(CLASSES)]
            assert float(props["temperature"]) == 1.5
            continue
        classes = ["lesion"] if weights.startswith("segmentation") else CLASSES
        assert json.loads(props["classes"]) == classes
        assert json.loads(props["input_size"]) == meta["input_size"] == (32 if classes == ["lesion"] else SIZE)
        assert json.loads(props["mean"]) == meta["mean"] and json.loads(props["std"]) == meta["std"]


def _input_shape(weights: str) -> tuple[int, ...]:
    """One input's shape without the batch axis: stacked probabilities for the vote, else an image."""
    if weights.startswith("ensemble"):
        return (len(FAMILIES), len(CLASSES))
    size = SIZE if weights.startswith("classification") else 32
    return (3, size, size)


@pytest.mark.e2e
def test_each_export_takes_any_batch_and_computes_what_pytorch_does(families):
    generator = torch.Generator().manual_seed(0)
    for weights in WEIGHTS:
        module = _torch_network(families.path / weights)
        path = (families.path / weights).with_suffix(".onnx")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        graph_input = session.get_inputs()[0]
        assert graph_input.shape[0] == "batch"  # a named, free batch axis
        for batch in (1, 3):
            x = torch.randn(batch, *_input_shape(weights), generator=generator)
            got = session.run(None, {graph_input.name: x.numpy()})[0]
            with torch.inference_mode():
                want = module(x).numpy()
            assert got.shape == want.shape and got.shape[0] == batch
            assert np.abs(got - want).max() <= PARITY * max(1.0, np.abs(want).max()), weights


@pytest.mark.e2e
def test_export_keeps_the_bundle_verified_and_its_identity(families):
    bundle = open_bundle(families.path)  # every ONNX file verified against SHA256SUMS with the rest
    assert bundle.identity == families.identity
    sums = (families.path / CHECKSUMS).read_bytes()
    kept = b"".join(line for line in sums.splitlines(keepends=True) if not line.rstrip().endswith(b".onnx"))
    assert kept == families.sums  # every line as it was: the identity's bytes
    for weights in WEIGHTS:
        rel = Path(weights).with_suffix(".onnx").as_posix()
        digest = hashlib.sha256((families.path / rel).read_bytes()).hexdigest()
        assert f"{digest}  {rel}\n".encode() in sums


@pytest.mark.e2e
def test_a_second_export_does_nothing_and_says_so(families):
    before = _snapshot(families.path)
    code, out, _ = _run(export_script.main, ["--model", str(families.path)])
    assert code == 0 and out.count("\n") == 1 and "nothing to do" in out
    assert _snapshot(families.path) == before


def _predict(bundle, photos, out, engine, cache):
    argv = ["--model", str(bundle), "--input", str(photos), "--out", str(out), "--engine", engine, "--device", "cpu",
            "--no-report", "--set", f"run.cache_dir={cache}", "--set", "run.threads=1"]  # fmt: skip
    code, stdout, err = _run(predict_script.main, argv)
    assert code == 0, err
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f)), stdout


@pytest.mark.e2e
def test_onnxruntime_predicts_what_pytorch_does_and_never_from_its_cache(families, tmp_path):
    photos = tmp_path / "photos"
    write_photo_folder(photos, 4, 64, seed=1)
    cache = tmp_path / "cache"
    torch_rows, _ = _predict(families.path, photos, tmp_path / "pytorch", "pytorch", cache)
    ort_rows, out = _predict(families.path, photos, tmp_path / "onnxruntime", "onnxruntime", cache)
    assert "cache: 0 reused, 24 computed" in out  # 4 crops + 4 x 5 backbones: none of PyTorch's entries served
    ids = [f"photo_{i:03d}" for i in range(4)]
    assert [r["image_id"] for r in ort_rows] == [r["image_id"] for r in torch_rows] == ids
    for a, b in zip(torch_rows, ort_rows):
        assert a["box"] == b["box"] and a["predicted"] == b["predicted"] and a["model"] == b["model"]
        assert max(abs(float(a[c]) - float(b[c])) for c in CLASSES) <= PARITY
    assert families.identity in ort_rows[0]["model"]
    _, again = _predict(families.path, photos, tmp_path / "again", "onnxruntime", cache)
    assert "cache: 24 reused, 0 computed" in again  # its own entries, found again


@pytest.mark.e2e
def test_every_network_gives_the_same_arrays_on_both_engines(families, tmp_path):
    stages = open_bundle(families.path).stage_paths()
    predictors = {}
    for engine in ("pytorch", "onnxruntime"):
        cfg = PredictConfig(**stages, engine=engine, run=RunConfig(cache_dir=str(tmp_path / engine), threads=1))
        predictors[engine] = EnsemblePredictor(cfg, torch.device("cpu"))
    runtime = predictors["onnxruntime"]
    assert isinstance(runtime.segmenter.model, OnnxModule) and isinstance(runtime.meta_model, OnnxModule)
    assert all(isinstance(c.predictor.model, OnnxModule) for c in runtime.classifiers)
    photos = tmp_path / "photos"
    write_photo_folder(photos, 3, 64, seed=2)
    paths = sorted(photos.glob("photo_*.jpg"))
    images = [resize_square(read_image(p), 32) for p in paths]  # square, at the U-Net's size
    masks = {
        engine: predict_probabilities(p.segmenter.model, images, p.segmenter.mean, p.segmenter.std, torch.device("cpu"))
        for engine, p in predictors.items()
    }  # fmt: skip
    assert masks["pytorch"].shape == (3, 32, 32)
    assert np.abs(masks["pytorch"] - masks["onnxruntime"]).max() <= PARITY
    items = [(p.stem, str(p)) for p in paths]
    crops = list(predictors["pytorch"].segmenter.crop(items))  # the same crops into both engines' classifiers
    stacked, final = predictors["pytorch"].vote(crops)
    ort_stacked, ort_final = runtime.vote(crops)
    assert stacked.shape == (3, len(FAMILIES), len(CLASSES))
    for b, family in enumerate(FAMILIES):
        assert np.abs(stacked[:, b] - ort_stacked[:, b]).max() <= PARITY, family
    assert np.abs(final - ort_final).max() <= PARITY


def test_a_failed_export_leaves_the_bundle_byte_for_byte(small, monkeypatch):
    before = _snapshot(small)
    real = torch.onnx.export

    def fails_on_the_vote(module, args, path, **kwargs):
        if str(path).endswith("meta.onnx"):  # the last one: the others are written by then
            raise RuntimeError("Exporting the operator 'aten::einsum' is not supported\nmore")
        return real(module, args, path, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", fails_on_the_vote)
    code, out, err = _run(export_script.main, ["--model", str(small)])
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: cannot export ensemble/meta.safetensors to ONNX (RuntimeError: Exporting")
    assert _snapshot(small) == before
    monkeypatch.setattr(torch.onnx, "export", real)

    def full_disk(path, data, fsync=False):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(onnx_export, "write_bytes_atomic", full_disk)  # after the files are moved in
    code, _, err = _run(export_script.main, ["--model", str(small)])
    assert code == 2 and "No space left on device" in err
    assert _snapshot(small) == before  # the files moved in are taken out again
    identity = open_bundle(small).identity
    monkeypatch.undo()
    assert _run(export_script.main, ["--model", str(small)])[0] == 0
    assert open_bundle(small).identity == identity


def test_a_tampered_bundle_is_refused_before_anything_is_written(small):
    config = small / "segmentation" / "config.yaml"
    config.write_text(config.read_text() + "# changed\n")
    before = _snapshot(small)
    code, _, err = _run(export_script.main, ["--model", str(small)])
    assert code == 2 and "refused" in err and "segmentation/config.yaml does not match" in err
    assert _snapshot(small) == before


def test_onnxruntime_without_the_export_names_the_file_and_the_command(small, tmp_path):
    photos = tmp_path / "photos"
    write_photo_folder(photos, 1, 64, seed=0)
    argv = ["--model", str(small), "--input", str(photos), "--out", str(tmp_path / "out"), "--engine", "onnxruntime",
            "--device", "cpu", "--set", f"run.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    code, _, err = _run(predict_script.main, argv)
    assert code == 2 and err.count("\n") == 1
    assert f"{small / 'classification' / 'test_resnet' / 'best.onnx'} not found" in err
    assert "`dermpipe export --model BUNDLE --format onnx`" in err


def test_an_export_of_other_weights_is_refused(small):
    assert _run(export_script.main, ["--model", str(small)])[0] == 0
    weights = small / "ensemble" / "meta.safetensors"
    module = load_meta(weights)[0]
    with pytest.raises(OnnxModelError, match="exported from other weights"):
        open_onnx(weights, "0" * 64, module, torch.device("cpu"))
    runner = open_onnx(weights, hashlib.sha256(weights.read_bytes()).hexdigest(), module, torch.device("cpu"))
    assert runner.n_classes == len(CLASSES)  # every other attribute is the torch module's
    probs = torch.softmax(torch.randn(2, 1, len(CLASSES)), -1)
    copy = pickle.loads(pickle.dumps(runner))  # as a spawned worker gets it: the session opened again there
    assert torch.equal(copy(probs), runner(probs)) and copy.n_classes == len(CLASSES)


def test_the_speed_benchmark_compares_both_engines_on_the_same_batches(tmp_path):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "onnx_speed.py"
    spec = importlib.util.spec_from_file_location("onnx_speed", path)
    script = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(script)
    finally:
        sys.path.remove(str(path.parent))
    args = ["--images", "4", "--batch", "2", "--seg-size", "32", "--encoder", "tu-test_resnet", "--backbones",
            "test_resnet", "--size", "32", "--repeats", "1", "--threads", "1", "--out", str(tmp_path),
            "--no-cold-start", "--profile"]  # fmt: skip
    assert _run(script.main, args)[0] == 0
    result = json.loads((tmp_path / "onnx_speed.json").read_text())
    for part in ("forward", "predict"):
        for engine in ("pytorch", "onnxruntime", "onnxruntime-int8"):
            assert result[part][f"{engine}_img_s"] > 0
        assert result[part]["int8_ratio"] == pytest.approx(result[part]["onnxruntime-int8_img_s"]
                                                           / result[part]["pytorch_img_s"])  # fmt: skip
    assert 0.0 <= result["predict"]["int8_class_agreement"] <= 1.0
    for engine, passes in result["profile"].items():
        for seconds in passes.values():  # every step counted once: the steps add up to the pass
            steps = {k: v for k, v in seconds.items() if k != "total"}
            assert set(steps) == {"reading", "U-Net", "crops", "classifiers", "vote", "rows and files"}
            assert min(steps.values()) >= 0 and sum(steps.values()) == pytest.approx(seconds["total"], rel=1e-6)
            assert steps["U-Net"] > 0 and steps["classifiers"] > 0, engine
    assert result["forward"]["ratio"] == pytest.approx(result["forward"]["onnxruntime_img_s"]
                                                       / result["forward"]["pytorch_img_s"])  # fmt: skip
    assert result["predict"]["max_abs_probability_difference"] <= PARITY
