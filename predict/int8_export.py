"""int8 networks for ONNX Runtime on the CPU, held to an agreement gate:
``dermpipe export --model ham-v1 --format onnx --quantize int8 --calibration runs/ham.csv``.

The U-Net and each classifier are quantised statically (ONNX Runtime's quantisation tools: QDQ, per-channel int8
weights, uint8 activations, MinMax ranges), calibrated on the very inputs each network sees when the float32 export
predicts the bundle's own validation images (the ``val`` rows of the manifest its models were trained on, recorded by
digest in ``int8.json``): the U-Net on those photos, each classifier on their lesion crops. The vote is tiny
and stays float32.

The gate, on the same validation images: each network's own agreement with its float32 export (a classifier's top
class on its crops, the U-Net's lesion pixels) must reach ``min_agreement`` (99%), or that network stays float32 (one
line saying which and why); then the whole pipeline with the int8 networks must agree with the float32 one on the
predicted class and on the refer decision for ``min_agreement`` of the images, or nothing is written (one line naming
the network that agrees least). The largest probability difference and the melanoma sensitivity at the refer
threshold of both are recorded in ``int8.json`` with the calibration images' digests; ``dermpipe predict --engine
onnxruntime-int8`` runs the result. Files are written beside the bundle first, then moved in with SHA256SUMS
rewritten; the bundle's identity does not change (int8 files are derived, as the ONNX export is).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from dermpipe.bundle.onnx_export import export_onnx, install_derived, weights_files
from dermpipe.bundle.store import INT8_RECORD, Bundle, BundleError, bundle_checksums, open_bundle
from dermpipe.data.manifest import Manifest
from dermpipe.engine.files import file_digest, write_text_atomic
from dermpipe.engine.onnx_runtime import INT8_ENGINE, OnnxModule, int8_file
from dermpipe.ensemble.calibration import referral_outcome
from dermpipe.predict.api import load
from dermpipe.version import __version__

GATE_AGREEMENT = 0.99
CALIBRATION_IMAGES = 100  # validation images the export predicts (calibration and gate)
# at most this many recorded inputs per network (evenly spaced) calibrate it, 8 at a time: MinMax keeps every
# intermediate tensor of them in memory until the end (its CalibMaxIntermediateOutputs drops them unmerged)
CALIBRATION_INPUTS = 32


class Int8ExportError(BundleError):
    """An int8 export refused: no validation images to calibrate on, or the int8 pipeline fails the gate."""


@dataclass
class Recorded:
    """The inputs one network saw while the float32 export predicted the validation images."""

    weights: str  # bundle path of its safetensors
    runner: OnnxModule
    batches: list[np.ndarray] = field(default_factory=list)


@dataclass(frozen=True)
class Int8Result:
    bundle: Bundle
    written: list[str]  # bundle paths
    kept_float: dict[str, str]  # network -> why it stays float32
    gate: dict[str, Any]


def calibration_images(manifest: str | os.PathLike, limit: int) -> list[tuple[str, str, str]]:
    """``(image_id, path, label)`` of the manifest's validation rows, the first ``limit`` by image id."""
    path = Path(manifest)
    if not path.is_file():
        raise Int8ExportError(
            f"calibration manifest {path} not found: pass the manifest the bundle's models were trained on "
            "(--calibration)"
        )
    rows = sorted(Manifest.read(path).select("val").rows, key=lambda r: r["image_id"])[:limit]
    if not rows:
        raise Int8ExportError(
            f"{path} has no val rows: int8 calibration needs the validation images of the manifest the bundle's "
            "models were trained on"
        )
    return [(r["image_id"], r["image_path"], r.get("label", "")) for r in rows]


def _load(bundle: Bundle, cache: Path, threads: int) -> Any:
    return load(bundle.path, engine="onnxruntime", device="cpu", cache_dir=cache, settings=[f"run.threads={threads}"])


def _networks(model: Any, bundle: Bundle) -> dict[str, Any]:
    """Bundle weights path -> the object holding that network's runner (``.model``), U-Net first."""
    stages = weights_files(bundle)
    seg = next(w for w, s in stages.items() if s == "segmentation")
    classifiers = [w for w, s in stages.items() if s == "classification"]
    return {
        seg: model.predictor.segmenter,
        **{w: c.predictor for w, c in zip(classifiers, model.predictor.classifiers)},
    }


def _record(runner: OnnxModule, store: list[np.ndarray]) -> None:
    real = runner.outputs

    def outputs(x: torch.Tensor) -> list[torch.Tensor]:
        store.append(np.ascontiguousarray(x.detach().cpu().numpy(), np.float32))
        return real(x)

    runner.outputs = outputs  # type: ignore[method-assign]


def float_pass(bundle: Bundle, images: Sequence[tuple[str, str, str]], work: Path, threads: int):
    """The float32 export over ``images``: (records by image id, each network's recorded inputs)."""
    model = _load(bundle, work / "cache32", threads)
    recorded = {}
    for weights, holder in _networks(model, bundle).items():
        recorded[weights] = Recorded(weights, holder.model)
        _record(holder.model, recorded[weights].batches)
    rows = model.predict([p for _, p, _ in images], skip_unreadable=True)
    for rec in recorded.values():
        del rec.runner.outputs  # recording ends: the class's own method again
    return {r.path: r for r in rows if hasattr(r, "predicted")}, recorded


class _Reader:
    """ONNX Runtime's calibration data reader over recorded batches."""

    def __init__(self, name: str, batches: Sequence[np.ndarray]) -> None:
        self.name, self.batches = name, iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.name: batch}


def quantize_network(source: Path, target: Path, batches: Sequence[np.ndarray]) -> None:
    """``source`` (a float32 ONNX file) -> ``target``: QDQ, per-channel int8 weights, uint8 activations calibrated
    (MinMax) on ``batches``; the source's metadata kept, with the precision and the calibration added."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.with_name(target.name + ".pre")
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    name = onnx.load(str(prepared), load_external_data=False).graph.input[0].name
    inputs = np.concatenate(list(batches))
    inputs = inputs[np.linspace(0, len(inputs) - 1, min(len(inputs), CALIBRATION_INPUTS)).round().astype(int)]
    logging.disable(logging.WARNING)  # its per-channel notes on weights of rank 1 (norms left unfused), per weight
    try:
        _quantize_static(prepared, target, name, inputs)
    finally:
        logging.disable(logging.NOTSET)
    prepared.unlink()
    props = {p.key: p.value for p in onnx.load(str(source), load_external_data=False).metadata_props}
    model = onnx.load(str(target))
    onnx.helper.set_model_props(model, {**props, "precision": "int8", "quantization": "QDQ, per-channel int8 "
                                        "weights, uint8 activations, MinMax calibration"})  # fmt: skip
    onnx.save(model, str(target))


def _quantize_static(prepared: Path, target: Path, name: str, inputs: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(prepared),
        str(target),
        _Reader(name, [inputs[i : i + 8] for i in range(0, len(inputs), 8)]),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )


def network_agreement(weights: str, fp32: OnnxModule, int8: OnnxModule, batches: Sequence[np.ndarray]) -> float:
    """How often the int8 network gives the float32 one's answer on its recorded inputs: a classifier's top class,
    the U-Net's lesion pixels (probability over 0.5)."""
    same = total = 0
    for batch in batches:
        x = torch.from_numpy(batch)
        a, b = fp32.outputs(x)[0].numpy(), int8.outputs(x)[0].numpy()
        if weights.startswith("segmentation"):
            same, total = same + int(((a > 0) == (b > 0)).sum()), total + a.size
        else:
            same, total = same + int((a.argmax(1) == b.argmax(1)).sum()), total + len(a)
    return same / max(total, 1)


def int8_pass(
    bundle: Bundle, images: Sequence[tuple[str, str, str]], work: Path, threads: int, chosen: dict[str, Path]
):
    """The pipeline over ``images`` with the int8 files of ``chosen`` (weights -> int8 file in ``work``) in place of
    their float32 export: records by path."""
    model = _load(bundle, work / "cache8", threads)
    for weights, holder in _networks(model, bundle).items():
        if weights in chosen:
            holder.model = OnnxModule(chosen[weights], holder.model.module, torch.device("cpu"), threads)
    rows = model.predict([p for _, p, _ in images], skip_unreadable=True)
    return {r.path: r for r in rows if hasattr(r, "predicted")}


def gate_figures(
    fp32: dict[str, Any], int8: dict[str, Any], truth: dict[str, str], classes: Sequence[str], refer: tuple[str, float]
):
    """Agreement of the int8 pipeline's answers with the float32 one's on the same images, the largest probability
    difference, and the sensitivity of the refer class (predicted or referred) for both where labels are given."""
    paths = sorted(set(fp32) & set(int8))
    a, b = [fp32[p] for p in paths], [int8[p] for p in paths]
    pa = np.array([[r.probabilities[c] for c in classes] for r in a])
    pb = np.array([[r.probabilities[c] for c in classes] for r in b])
    figures: dict[str, Any] = {
        "images": len(paths),
        "class_agreement": float(np.mean([x.predicted == y.predicted for x, y in zip(a, b)])) if paths else 0.0,
        "refer_agreement": float(np.mean([x.refer == y.refer for x, y in zip(a, b)])) if paths else 0.0,
        "max_probability_difference": float(np.abs(pa - pb).max()) if paths else 0.0,
    }
    refer_class, threshold = refer
    labels = np.array([classes.index(truth[p]) if truth.get(p) in classes else -1 for p in paths])
    if refer_class in classes and (labels == classes.index(refer_class)).any():
        known = labels >= 0
        for name, probs in (("float32", pa), ("int8", pb)):
            outcome = referral_outcome(probs[known], labels[known], classes.index(refer_class), threshold)
            figures[f"{refer_class}_sensitivity_{name}"] = outcome["sensitivity_with_referral"]
    return figures


def _refuse_line(figures: dict[str, Any], agreements: dict[str, float], minimum: float) -> str:
    worst = min(agreements, key=agreements.get)
    return (
        f"int8 export refused: the int8 pipeline agrees with float32 on the predicted class for "
        f"{figures['class_agreement']:.1%} and on the refer decision for {figures['refer_agreement']:.1%} of "
        f"{figures['images']} validation images (at least {minimum:.0%} needed); the network that agrees least is "
        f"{worst} ({agreements[worst]:.1%} on its own inputs); the bundle is unchanged (predict with --engine "
        "onnxruntime)"
    )


def _install_int8(bundle: Bundle, work: Path, files: dict[str, Path], record: dict[str, Any]) -> list[str]:
    """The int8 files (each just before its weights in SHA256SUMS) and ``int8.json`` (listed last) moved in."""
    write_text_atomic(work / INT8_RECORD, json.dumps(record, indent=2) + "\n")
    added = {w: int8_file(w).as_posix() for w in files}  # written at work / that path by _quantize_all
    install_derived(bundle, work, added, extra=[INT8_RECORD])
    return sorted([*added.values(), INT8_RECORD])


def _quantize_all(recorded: dict[str, Recorded], work: Path, minimum: float, threads: int, log: Callable[[str], None]):
    """Each network quantised and checked on its own inputs: (weights -> int8 file, agreements, kept float32)."""
    chosen, agreements, kept = {}, {}, {}
    for weights, rec in recorded.items():
        target = work / int8_file(weights)
        target.parent.mkdir(parents=True, exist_ok=True)
        quantize_network(rec.runner.path, target, rec.batches)
        int8 = OnnxModule(target, rec.runner.module, torch.device("cpu"), threads)
        agreements[weights] = network_agreement(weights, rec.runner, int8, rec.batches)
        if agreements[weights] >= minimum:
            chosen[weights] = target
        else:
            kept[weights] = (
                f"agrees with float32 on {agreements[weights]:.1%} of its validation inputs (< {minimum:.0%})"
            )
            log(f"int8: {weights} stays float32: it {kept[weights]}")
    return chosen, agreements, kept


def export_int8(
    path: str | os.PathLike,
    manifest: str | os.PathLike,
    *,
    images: int = CALIBRATION_IMAGES,
    min_agreement: float = GATE_AGREEMENT,
    threads: int = 0,
    log: Callable[[str], None] = print,
) -> Int8Result:
    """Quantise the bundle at ``path`` (its float32 ONNX export made first when missing), calibrated and gated on the
    val rows of ``manifest``; ``Int8ExportError`` (the bundle unchanged) when the gate fails."""
    bundle, _ = export_onnx(path)
    if INT8_RECORD in bundle_checksums(bundle):
        return Int8Result(bundle, [], {}, json.loads((bundle.path / INT8_RECORD).read_text())["gate"])
    chosen_images = calibration_images(manifest, images)
    work = Path(tempfile.mkdtemp(prefix=f".{bundle.path.name}.int8-", dir=bundle.path.parent))
    try:
        fp32_rows, recorded = float_pass(bundle, chosen_images, work, threads)
        chosen, agreements, kept = _quantize_all(recorded, work, min_agreement, threads, log)
        if not chosen:
            worst = min(agreements, key=agreements.get)
            raise Int8ExportError(f"int8 export refused: no network keeps its answers under int8 ({worst}: "
                                  f"{kept[worst]}); the bundle is unchanged")  # fmt: skip
        int8_rows = int8_pass(bundle, chosen_images, work, threads, chosen)
        meta = bundle.info.get("calibration") or {}
        refer = (meta.get("refer_class") or "mel", float(meta.get("refer_threshold") or 0.0))
        truth = {path: label for _, path, label in chosen_images}
        figures = gate_figures(fp32_rows, int8_rows, truth, list(bundle.info["classes"]), refer)
        if min(figures["class_agreement"], figures["refer_agreement"]) < min_agreement:
            raise Int8ExportError(_refuse_line(figures, {w: agreements[w] for w in chosen}, min_agreement))
        record = {
            "engine": INT8_ENGINE,
            "dermpipe_version": __version__,
            "gate": {**figures, "min_agreement": min_agreement, "network_agreement": agreements},
            "int8": sorted(int8_file(w).as_posix() for w in chosen),
            "float32": kept,
            "calibration": {
                "manifest": file_digest(manifest),
                "split": "val",
                "images": {i: file_digest(p) for i, p, _ in chosen_images},
            },  # fmt: skip
        }
        written = _install_int8(bundle, work, chosen, record)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Int8Result(open_bundle(bundle.path), written, kept, record["gate"])


def int8_record(bundle: Bundle) -> dict[str, Any] | None:
    """The bundle's int8.json (gate figures, calibration images, which networks are int8), or ``None``."""
    path = bundle.path / INT8_RECORD
    return json.loads(path.read_text()) if INT8_RECORD in bundle_checksums(bundle) and path.is_file() else None


def int8_card(record: dict[str, Any]) -> str:
    """The model card's section on the int8 engine (served with MODEL_CARD.md, which itself stays as bundled)."""
    g = record["gate"]
    lines = [
        "## int8 engine (`--engine onnxruntime-int8`)",
        "",
        f"Statically quantised ({', '.join(record['int8'])}; float32: {', '.join(record['float32']) or 'the vote'}), "
        f"calibrated and gated on {g['images']} validation images (digests in int8.json).",
        "",
        "| against float32 | value |",
        "|---|---|",
        f"| predicted class agrees | {g['class_agreement']:.1%} |",
        f"| refer decision agrees | {g['refer_agreement']:.1%} |",
        f"| largest probability difference | {g['max_probability_difference']:.3g} |",
    ]
    lines += [f"| {k.replace('_', ' ')} | {v:.3f} |" for k, v in g.items() if "_sensitivity_" in k]
    return "\n".join(lines) + "\n"
