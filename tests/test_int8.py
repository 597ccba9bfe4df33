"""The int8 engine: `dermpipe export --quantize int8` calibrated and gated on the bundle's validation images, what it
writes (identity unchanged, digests recorded), a network whose quantisation fails the gate kept float32 or the whole
export refused with the bundle unchanged, and `--engine onnxruntime-int8` agreeing with float32 on the demo bundle."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from dermpipe.bundle.store import CHECKSUMS, open_bundle
from dermpipe.data.manifest import Manifest
from dermpipe.engine.files import file_digest
from dermpipe.pipeline import demo
from dermpipe.predict import cli as predict_cli
from dermpipe.predict import export as export_script
from dermpipe.predict import int8_export
from dermpipe.serve.main import model_card

pytestmark = pytest.mark.e2e  # a demo pipeline trained, exported and quantised


def _run(main, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _snapshot(bundle: Path) -> dict[str, bytes]:
    return {p.relative_to(bundle).as_posix(): p.read_bytes() for p in sorted(bundle.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The demo (two tiny classifiers) and its bundle with its float32 ONNX export, kept pristine: tests copy it."""
    tmp = tmp_path_factory.mktemp("int8")
    code = demo.main(["--out", str(tmp / "demo"), "--images", "60", "--seg-epochs", "2", "--cls-epochs", "2",
                      "--backbones", "test_resnet,test_efficientnet"])  # fmt: skip
    assert code == 0
    code, _, err = _run(export_script.main, ["--model", str(tmp / "demo" / "bundle"), "--format", "onnx"])
    assert code == 0, err
    return tmp / "demo"


@pytest.fixture
def bundle(world, tmp_path):
    copy = tmp_path / "ham-v1"
    shutil.copytree(world / "bundle", copy)
    return copy


def _export(bundle: Path, manifest: Path, *extra: str):
    argv = ["--model", str(bundle), "--format", "onnx", "--quantize", "int8", "--calibration", str(manifest), *extra]
    return _run(export_script.main, argv)


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {r["image_id"]: r for r in csv.DictReader(f)}


def test_int8_export_passes_the_gate_records_its_images_and_keeps_the_identity(world, bundle):
    before = open_bundle(bundle)
    manifest = world / "data" / "manifest.csv"
    code, out, err = _export(bundle, manifest)
    assert code == 0, err
    after = open_bundle(bundle)  # verified against SHA256SUMS, which lists the new files
    assert after.identity == before.identity
    sums = (bundle / CHECKSUMS).read_text()
    for weights in ("segmentation/best", "classification/test_resnet/best", "classification/test_efficientnet/best"):
        path = bundle / f"{weights}.int8.onnx"
        assert f"{file_digest(path)}  {weights}.int8.onnx" in sums
        model = onnx.load(str(path))
        assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)  # QDQ
        props = {p.key: p.value for p in model.metadata_props}
        assert props["precision"] == "int8" and props["source_sha256"] == file_digest(bundle / f"{weights}.safetensors")
    record = json.loads((bundle / "int8.json").read_text())
    gate = record["gate"]
    assert gate["class_agreement"] >= 0.99 and gate["refer_agreement"] >= 0.99
    assert 0 <= gate["max_probability_difference"] < 0.2 and gate["images"] > 0
    val = Manifest.read(manifest).select("val").rows
    assert record["calibration"]["manifest"] == file_digest(manifest)
    assert record["calibration"]["images"] == {r["image_id"]: file_digest(r["image_path"]) for r in val}
    assert "class agrees" in out and "--engine onnxruntime-int8" in out
    card = model_card(after, "onnxruntime-int8")
    assert card["int8"] == record and "## int8 engine" in card["model_card"]
    assert f"{gate['class_agreement']:.1%}" in card["model_card"]

    code, out, _ = _export(bundle, manifest)  # a second time: nothing to do, nothing changed
    assert code == 0 and "already" in out and (bundle / CHECKSUMS).read_text() == sums

    photos, runs = world / "photos", bundle.parent
    for engine in ("onnxruntime", "onnxruntime-int8"):
        argv = ["--model", str(bundle), "--input", str(photos), "--engine", engine, "--out", str(runs / engine)]
        code, _, err = _run(predict_cli.main, [*argv, "--set", f"run.cache_dir={runs / 'c'}"])
        assert code == 0, err
    fp32, int8 = _rows(runs / "onnxruntime" / "predictions.csv"), _rows(runs / "onnxruntime-int8" / "predictions.csv")
    assert sorted(fp32) == sorted(int8) and len(fp32) >= 20
    agree = np.mean([fp32[i]["predicted"] == int8[i]["predicted"] for i in fp32])
    assert agree >= 0.9  # new photos, not the gate's: close, not necessarily 99%
    assert any(fp32[i]["nv"] != int8[i]["nv"] for i in fp32)  # the int8 networks did run


def test_a_network_whose_quantisation_fails_stays_float32_and_one_that_breaks_everything_is_refused(
    world, bundle, monkeypatch
):
    manifest = world / "data" / "manifest.csv"
    real = int8_export.quantize_network

    def broken_for(names):
        def quantize(source, target, batches):
            real(source, target, batches)
            if any(n in str(source) for n in names):  # its logits negated: it no longer answers what it did
                model = onnx.load(str(target))
                logits = model.graph.output[0].name
                for node in model.graph.node:
                    node.output[:] = [f"{o}_kept" if o == logits else o for o in node.output]
                model.graph.node.append(onnx.helper.make_node("Neg", [f"{logits}_kept"], [logits]))
                onnx.save(model, str(target))

        return quantize

    monkeypatch.setattr(int8_export, "quantize_network", broken_for(["test_efficientnet"]))
    code, out, err = _export(bundle, manifest, "--min-agreement", "0.8")  # 8 validation images: a flip is 12.5%
    assert code == 0, err
    assert "int8: classification/test_efficientnet/best.safetensors stays float32: it agrees with float32 on" in out
    record = json.loads((bundle / "int8.json").read_text())
    assert list(record["float32"]) == ["classification/test_efficientnet/best.safetensors"]
    assert not (bundle / "classification" / "test_efficientnet" / "best.int8.onnx").exists()
    assert (bundle / "classification" / "test_resnet" / "best.int8.onnx").is_file()

    fresh = bundle.parent / "fresh"
    shutil.copytree(world / "bundle", fresh)
    kept = _snapshot(fresh)
    monkeypatch.setattr(int8_export, "quantize_network", broken_for(["segmentation", "classification"]))
    code, out, err = _export(fresh, manifest, "--min-agreement", "0.8")
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: int8 export refused: no network keeps its answers")
    assert _snapshot(fresh) == kept and sorted(p.name for p in fresh.parent.iterdir()) == ["fresh", "ham-v1"]


def test_the_gate_refuses_below_its_agreement_and_calibration_data_without_validation_images(world, bundle, tmp_path):
    kept = _snapshot(bundle)
    manifest = world / "data" / "manifest.csv"
    code, _, err = _export(bundle, manifest, "--min-agreement", "1.01")  # no int8 network can reach it
    assert code == 2 and "error: int8 export refused" in err and _snapshot(bundle) == kept
    lines = manifest.read_text().splitlines(keepends=True)
    split = lines[0].rstrip().split(",").index("split")
    other = tmp_path / "no-val.csv"
    other.write_text("".join([lines[0], *(x for x in lines[1:] if x.rstrip().split(",")[split] != "val")]))
    code, _, err = _export(bundle, other)
    assert code == 2 and f"{other} has no val rows" in err and _snapshot(bundle) == kept
    code, _, err = _run(predict_cli.main, ["--model", str(bundle), "--input", str(world / "photos"), "--engine",
                                           "onnxruntime-int8", "--out", str(tmp_path / "p")])  # fmt: skip
    assert code == 2 and "no int8 network beside these weights" in err
