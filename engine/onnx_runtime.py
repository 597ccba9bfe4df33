"""ONNX Runtime in place of a torch module, so prediction runs the same code on either engine.

``engine_model`` gives the loaded torch module itself under ``pytorch``; under ``onnxruntime`` an ``OnnxModule`` of the
ONNX export beside the module's weights (``best.safetensors`` -> ``best.onnx``, written by ``dermpipe export``). An
``OnnxModule`` is called as the module is (a tensor in, a tensor out on the same device) and hands every other
attribute (``input_size``, ``data_config``, ``num_classes``, ``parameters``...) to the module, so preprocessing, TTA,
cropping and caching are the pipeline's own whatever runs the networks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dermpipe.engine.files import file_digest
from dermpipe.errors import DermpipeError

ENGINES: tuple[str, ...] = ("pytorch", "onnxruntime")
EXPORT_COMMAND = "dermpipe export --model BUNDLE --format onnx"
SOURCE_DIGEST = "source_sha256"  # the metadata key that names the weights an ONNX file was exported from


class OnnxModelError(DermpipeError):
    """An ONNX export that is missing beside its weights, that is not an ONNX model, or that was made from other
    weights."""


def onnx_file(weights: str | os.PathLike) -> Path:
    """Where the ONNX export of a weights file lies: beside it, the same name with ``.onnx``."""
    return Path(weights).with_suffix(".onnx")


def providers(device: torch.device) -> list[str]:
    """ONNX Runtime's execution providers for ``device``: CUDA first on a CUDA device when this build has it."""
    import onnxruntime as ort

    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session_options(threads: int = 0) -> Any:
    """Every graph optimisation (constant folding, Conv+BatchNorm and activation fusions, layout changes), and
    ``threads`` intra-op threads when given (0: ONNX Runtime's default, one per physical core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 0:
        options.intra_op_num_threads = threads
    return options


class OnnxModule:
    """An ONNX Runtime session called like ``module`` (the torch module it was exported from), which answers every
    other attribute."""

    def __init__(self, path: Path, module: torch.nn.Module, device: torch.device, threads: int = 0) -> None:
        self.path, self.module, self.device, self.threads = path, module, device, threads
        self.digest = file_digest(path)
        self._session = self._open()
        self.input_name = self._session.get_inputs()[0].name

    def _open(self) -> Any:
        import onnxruntime as ort
        from onnxruntime.capi import onnxruntime_pybind11_state as state

        try:
            return ort.InferenceSession(str(self.path), session_options(self.threads), providers=providers(self.device))
        except (state.InvalidProtobuf, state.InvalidGraph, state.InvalidArgument, state.NoModel) as error:
            reason = str(error).rsplit(":", 1)[-1].strip(" .") or type(error).__name__  # bytes that are no model
            raise OnnxModelError(
                f"{self.path} is not a valid ONNX model ({reason}): export it again with `{EXPORT_COMMAND}` (or "
                "predict with --engine pytorch)"
            ) from None

    @property
    def session(self) -> Any:
        if self._session is None:  # dropped when pickled for a worker process: opened again where it is used
            self._session = self._open()
        return self._session

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.outputs(x)[0]

    def outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every output of the graph, in its order (a classifier's: logits, then its pooled features)."""
        inputs = {self.input_name: np.ascontiguousarray(x.detach().cpu().numpy(), np.float32)}
        return [torch.from_numpy(out).to(x.device) for out in self.session.run(None, inputs)]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("module", "_session"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.module, name)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (a DataLoader worker under the spawn start method) without the session, which cannot be."""
        return {**self.__dict__, "_session": None}


def open_onnx(
    weights: Path, digest: str, module: torch.nn.Module, device: torch.device, threads: int = 0
) -> OnnxModule:
    """The ONNX export beside ``weights`` (sha256 ``digest``) as an ``OnnxModule``; one line naming the command when
    it is missing, or when it records other weights than these (exported before the weights were replaced)."""
    path = onnx_file(weights)
    if not path.is_file():
        raise OnnxModelError(
            f"{path} not found: --engine onnxruntime runs the ONNX export beside each network's weights; make them "
            f"with `{EXPORT_COMMAND}` (or predict with --engine pytorch)"
        )
    runner = OnnxModule(path, module, device, threads)
    source = runner.session.get_modelmeta().custom_metadata_map.get(SOURCE_DIGEST)
    if source is not None and source != digest:
        raise OnnxModelError(
            f"{path} was exported from other weights than {weights}: export again with `{EXPORT_COMMAND}`"
        )
    return runner


def engine_model(
    module: torch.nn.Module,
    weights: str | os.PathLike,
    digest: str,
    engine: str,
    device: torch.device,
    threads: int = 0,
) -> tuple[Any, str]:
    """(what runs the network, the digest its cache entries are keyed on) for ``module`` loaded from ``weights``
    (sha256 ``digest``): the module and ``digest`` under ``pytorch``; under ``onnxruntime`` an ``OnnxModule`` of the
    export beside ``weights`` and the ONNX file's digest, so neither engine's results are served for the other's."""
    if engine == "pytorch":
        return module, digest
    if engine != "onnxruntime":
        raise OnnxModelError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
    runner = open_onnx(Path(weights), digest, module, device, threads)
    return runner, runner.digest
