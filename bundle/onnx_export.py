"""ONNX export of a bundle's networks, each beside its weights: ``segmentation/best.onnx``,
``classification/<backbone>/best.onnx`` and ``ensemble/meta.onnx``.

Each file holds the network's forward as prediction calls it (normalised images in, logits out; the classifiers with
their SE block), a dynamic batch axis, and metadata naming the classes, the input size and normalisation, what goes
in and out, the sha256 of the safetensors it was made from and the dermpipe version. The export is written into a
folder beside the bundle, checked (``onnx.checker``, then ONNX Runtime against PyTorch on a batch of another size
than the traced one), and only then moved in with SHA256SUMS rewritten: a failed export leaves the bundle as it was.
The bundle's identity does not change (``bundle.identity_digest`` leaves the ONNX lines out).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import onnxruntime.capi.onnxruntime_pybind11_state as ort_errors
import torch

from dermpipe.bundle.store import CHECKSUMS, Bundle, BundleError, bundle_checksums, open_bundle
from dermpipe.classification.backbones import load_classifier
from dermpipe.engine.files import file_digest, write_bytes_atomic
from dermpipe.engine.onnx_runtime import SOURCE_DIGEST, onnx_file, providers, session_options
from dermpipe.ensemble.meta import load_meta
from dermpipe.segmentation.model import load_unet
from dermpipe.version import __version__

FORMATS: tuple[str, ...] = ("onnx",)
OPSET = 17
# ONNX Runtime may differ from PyTorch by float32 rounding only: at most this much of the output's largest magnitude
CHECK_TOLERANCE = 1.0e-3
# what the exporter (RuntimeError), the checker and ONNX Runtime (its own kinds) raise for a network that fails
EXPORT_FAILURES = (
    RuntimeError,
    ValueError,
    TypeError,
    onnx.checker.ValidationError,
    onnx.shape_inference.InferenceError,
    ort_errors.Fail,
    ort_errors.InvalidArgument,
    ort_errors.InvalidGraph,
    ort_errors.NotImplemented,
    ort_errors.RuntimeException,
)


class OnnxExportError(BundleError):
    """A network that cannot be exported to ONNX, or whose export does not compute what the PyTorch model does."""


@dataclass(frozen=True)
class Network:
    """One of the bundle's networks, ready to export: its module, its input's shape, its names and metadata."""

    weights: str  # bundle path of its safetensors, e.g. classification/resnet50/best.safetensors
    module: torch.nn.Module
    shape: tuple[int, ...]  # one input's shape, without the batch axis
    names: tuple[str, str]  # the ONNX graph's input and output names
    props: dict[str, str]  # the ONNX file's metadata_props
    features: bool = False  # a classifier: a second output, its pooled features (the out-of-distribution check's)


class _WithFeatures(torch.nn.Module):
    """A classifier as its export runs it: (logits, pooled features) from one forward pass."""

    def __init__(self, classifier: torch.nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.classifier.forward_with_features(x)


def weights_files(bundle: Bundle) -> dict[str, str]:
    """Every network's weights (bundle path -> stage): the U-Net, the classifiers in the vote's order, the vote."""
    stages = {k: Path(v).relative_to(bundle.path) for k, v in bundle.stage_paths().items()}
    classifiers = [stages["classification_root"] / b / "best.safetensors" for b in bundle.info["backbones"]]
    return {
        (stages["segmentation_run"] / "best.safetensors").as_posix(): "segmentation",
        **{path.as_posix(): "classification" for path in classifiers},
        (stages["ensemble_run"] / "meta.safetensors").as_posix(): "ensemble",
    }


def _props(stage: str, weights: str, digest: str, fields: Mapping[str, Any]) -> dict[str, str]:
    """The metadata_props: every value a string, lists and numbers as JSON."""
    props = {"stage": stage, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}}
    return {**props, "source": weights, SOURCE_DIGEST: digest, "dermpipe_version": __version__}


def _classifier(path: Path, weights: str, digest: str) -> Network:
    model, meta = load_classifier(path, "cpu")
    size, classes = int(meta["input_size"]), list(meta["classes"])
    fields = {
        "backbone": meta["backbone"],
        "classes": classes,
        "input_size": size,
        "mean": list(meta["mean"]),
        "std": list(meta["std"]),
        "input": f"normalised RGB N x 3 x {size} x {size}: (pixel / 255 - mean) / std, after bundle.json's preprocess",
        "output": f"logits N x {len(classes)} (softmax: the class probabilities)",
        "fold_models": int(meta.get("fold_models") or 1),  # > 1: the log of the mean probability of that many models
        "features": "second output: the pooled features N x D the head reads (the out-of-distribution check scores "
        "them against ood.safetensors beside the weights)",
    }
    props = _props("classification", weights, digest, fields)
    return Network(weights, model, (3, size, size), ("image", "logits"), props, features=True)


def _unet(path: Path, weights: str, digest: str) -> Network:
    model, meta = load_unet(path, "cpu")
    size = int(meta["input_size"])
    fields = {
        "classes": ["lesion"],
        "input_size": size,
        "mean": list(meta["mean"]),
        "std": list(meta["std"]),
        "input": f"normalised RGB N x 3 x {size} x {size}: (pixel / 255 - mean) / std",
        "output": f"lesion logits N x 1 x {size} x {size} (sigmoid: the lesion probability)",
    }
    props = _props("segmentation", weights, digest, fields)
    return Network(weights, model, (3, size, size), ("image", "logits"), props)


def _vote(path: Path, weights: str, digest: str) -> Network:
    model, meta = load_meta(path)
    backbones, classes = list(meta["backbones"]), list(meta["classes"])
    shape = (len(backbones), len(classes))
    fields = {
        "classes": classes,
        "backbones": backbones,
        "input_size": list(shape),
        "mean": None,
        "std": None,
        "temperature": float(meta.get("temperature") or 1.0),
        "input": f"stacked probabilities N x {shape[0]} x {shape[1]} of the backbones, in the order of 'backbones'",
        "output": f"logits N x {shape[1]} (softmax of logits / temperature: the final probabilities)",
    }
    props = _props("ensemble", weights, digest, fields)
    return Network(weights, model, shape, ("probabilities", "logits"), props)


def load_network(bundle: Bundle, stage: str, weights: str, digest: str) -> Network:
    """The ``stage``'s network whose weights are ``weights`` (a bundle path, sha256 ``digest``), in eval mode on the
    CPU."""
    build = {"segmentation": _unet, "classification": _classifier, "ensemble": _vote}[stage]
    return build(bundle.path / weights, weights, digest)


def example_input(net: Network, batch: int, seed: int = 0) -> torch.Tensor:
    """A reproducible input of ``batch`` items: images as normalised pixels, or backbone probabilities for the vote."""
    x = torch.randn(batch, *net.shape, generator=torch.Generator().manual_seed(seed))
    return x.softmax(-1) if net.names[0] == "probabilities" else x


@contextmanager
def _export_errors(weights: str) -> Iterator[None]:
    """An exporter's, checker's or ONNX Runtime's failure as one line naming the network."""
    try:
        yield
    except EXPORT_FAILURES as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else "no message"
        why = f"{type(e).__name__}: {first}"
        raise OnnxExportError(f"cannot export {weights} to ONNX ({why}); the bundle is unchanged") from None


def export_network(net: Network, path: Path) -> None:
    """Write ``net`` as an ONNX file with a dynamic batch axis and its metadata, checked by ``onnx.checker``.

    TorchScript tracing (``dynamo=False``): it takes the backbones as they are, needs no onnxscript, and exports the
    five default families about five times faster than ``torch.export`` does (25 s against 135 s for all five at
    75 px on two cores).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    source, target = net.names
    with _export_errors(net.weights):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice and tracer warnings
            outputs = [target, "features"] if net.features else [target]
            torch.onnx.export(
                _WithFeatures(net.module).eval() if net.features else net.module,
                (example_input(net, 2),),
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=[source],
                output_names=outputs,
                dynamic_axes={source: {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
            )
        model = onnx.load(str(path))
        onnx.helper.set_model_props(model, net.props)
        onnx.save(model, str(path))
        onnx.checker.check_model(str(path), full_check=True)


def check_export(net: Network, path: Path) -> None:
    """ONNX Runtime on a batch of 3 (the export traced 2: the batch axis must be free) against PyTorch;
    ``OnnxExportError`` when they differ by more than float32 rounding."""
    x = example_input(net, 3, seed=1)
    with _export_errors(net.weights):
        session = ort.InferenceSession(str(path), session_options(), providers=providers(torch.device("cpu")))
        got_all = session.run(None, {net.names[0]: x.numpy()})
    with torch.inference_mode():
        want_all = [t.numpy() for t in net.module.forward_with_features(x)] if net.features else [net.module(x).numpy()]
    if len(got_all) != len(want_all):
        got_all = [*got_all, *([np.zeros(0)] * (len(want_all) - len(got_all)))]
    for got, want in zip(got_all, want_all):
        difference = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
        if not difference <= CHECK_TOLERANCE * max(1.0, float(np.abs(want).max())):
            raise OnnxExportError(
                f"the ONNX export of {net.weights} differs from PyTorch (shape {got.shape} against {want.shape}, "
                f"largest difference {difference:.3g}) on a test batch: not exported, the bundle is unchanged"
            )


def _checksums_with(sums: bytes, added: Mapping[str, tuple[str, str]]) -> bytes:
    """SHA256SUMS with a line for each ONNX file (weights path -> (ONNX path, its sha256)) just before its weights'
    line: every existing line is kept byte for byte, so the bundle's identity does not change."""
    lines = []
    for line in sums.splitlines(keepends=True):
        weights = line.partition(b"  ")[2].rstrip(b"\r\n").decode()
        if weights in added:
            rel, digest = added[weights]
            lines.append(f"{digest}  {rel}\n".encode())
        lines.append(line)
    return b"".join(lines)


def install_derived(bundle: Bundle, work: Path, added: Mapping[str, str], extra: Sequence[str] = ()) -> None:
    """Move the checked derived files (weights path -> its derived file's bundle path; ``extra``: bundle paths listed
    last, e.g. a record) from ``work`` into the bundle, then rewrite SHA256SUMS atomically; on any failure the files
    moved in are taken out again."""
    sums = bundle.path / CHECKSUMS
    digests = {weights: (rel, file_digest(work / rel)) for weights, rel in added.items()}
    data = _checksums_with(sums.read_bytes(), digests) + b"".join(
        f"{file_digest(work / rel)}  {rel}\n".encode() for rel in extra
    )
    moved: list[Path] = []
    try:
        for rel in [*added.values(), *extra]:
            os.replace(work / rel, bundle.path / rel)
            moved.append(bundle.path / rel)
        write_bytes_atomic(sums, data)
    except BaseException:
        for path in moved:
            path.unlink(missing_ok=True)
        raise


def export_onnx(path: str | os.PathLike) -> tuple[Bundle, list[str]]:
    """Export every network of the bundle at ``path`` that has no ONNX file yet; returns the bundle (verified again)
    and the bundle paths written (none when every export is there already). A tampered bundle is refused first."""
    bundle = open_bundle(path)
    listed = bundle_checksums(bundle)
    stages = weights_files(bundle)
    added = {w: onnx_file(w).as_posix() for w in stages if onnx_file(w).as_posix() not in listed}
    if not added:
        return bundle, []
    work = bundle.path.parent / f".{bundle.path.name}.onnx-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        for weights, rel in added.items():
            net = load_network(bundle, stages[weights], weights, listed[weights])
            export_network(net, work / rel)
            check_export(net, work / rel)
        install_derived(bundle, work, added)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return open_bundle(bundle.path), list(added.values())
