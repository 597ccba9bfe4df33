"""ONNX Runtime in place of a torch module, so prediction runs the same code on either engine.

``engine_model`` gives the loaded torch module itself under ``pytorch``; under ``onnxruntime`` an ``OnnxModule`` of the
ONNX export beside the module's weights (``best.safetensors`` -> ``best.onnx``, written by ``dermpipe export``). An
``OnnxModule`` is called as the module is (a tensor in, a tensor out on the same device) and hands every other
attribute (``input_size``, ``data_config``, ``num_classes``, ``parameters``...) to the module, so preprocessing, TTA,
cropping and caching are the pipeline's own whatever runs the networks.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dermpipe.engine.files import file_digest
from dermpipe.errors import DermpipeError

INT8_ENGINE = "onnxruntime-int8"  # the int8 networks `dermpipe export --quantize int8` adds; float32 where it kept one
ENGINES: tuple[str, ...] = ("pytorch", "onnxruntime", INT8_ENGINE)
INT8_SUFFIX = ".int8.onnx"
EXPORT_COMMAND = "dermpipe export --model BUNDLE --format onnx"
SOURCE_DIGEST = "source_sha256"  # the metadata key that names the weights an ONNX file was exported from


class OnnxModelError(DermpipeError):
    """An ONNX export that is missing beside its weights, that is not an ONNX model, or that was made from other
    weights."""


def onnx_file(weights: str | os.PathLike) -> Path:
    """Where the ONNX export of a weights file lies: beside it, the same name with ``.onnx``."""
    return Path(weights).with_suffix(".onnx")


def int8_file(weights: str | os.PathLike) -> Path:
    """Where the int8 export of a weights file lies: beside it, ``best.safetensors`` -> ``best.int8.onnx``."""
    return Path(weights).with_suffix(INT8_SUFFIX)


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


@functools.cache
def _machine() -> str:
    """What an optimised graph is specific to: ONNX Runtime's version and this CPU (its model and instruction sets)."""
    import platform

    import onnxruntime as ort

    lines: list[str] = []
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = "|".join(next((line for line in lines if line.startswith(key)), "") for key in ("model name", "flags"))
    return hashlib.sha256(f"{ort.__version__}|{platform.machine()}|{cpu}".encode()).hexdigest()[:16]


def optimised_session(path: Path, digest: str, threads: int, chosen: list[str]) -> Any:
    """An ONNX Runtime session of ``path`` (sha256 ``digest``). Its graph, once optimised, is kept in the user's cache
    (keyed on the file's digest, ONNX Runtime's version, this CPU and the providers): a later start loads it with no
    optimisation to redo. On the CUDA provider, or when the cache cannot be written, the file itself is optimised."""
    import onnxruntime as ort

    from dermpipe.engine.cache import user_cache_dir

    options = session_options(threads)
    if chosen != ["CPUExecutionProvider"]:
        return ort.InferenceSession(str(path), options, providers=chosen)
    cached = user_cache_dir() / "onnxruntime" / f"{digest[:32]}-{_machine()}.onnx"
    if cached.is_file():
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        with contextlib.suppress(Exception):  # a damaged cached graph: optimise the file again below
            return ort.InferenceSession(str(cached), options, providers=chosen)
        options = session_options(threads)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f".{cached.name}.{os.getpid()}")
        options.optimized_model_filepath = str(partial)
        options.log_severity_level = 3  # not its warning that the saved graph suits this machine only: it is keyed so
        session = ort.InferenceSession(str(path), options, providers=chosen)
        os.replace(partial, cached)  # whole or not at all, for any process reading it
        return session
    except OSError:
        return ort.InferenceSession(str(path), session_options(threads), providers=chosen)


class OnnxModule:
    """An ONNX Runtime session called like ``module`` (the torch module it was exported from), which answers every
    other attribute."""

    def __init__(self, path: Path, module: torch.nn.Module, device: torch.device, threads: int = 0) -> None:
        self.path, self.module, self.device, self.threads = path, module, device, threads
        self.digest = file_digest(path)
        self.precision = "int8" if path.name.endswith(INT8_SUFFIX) else "float32"
        self._session = self._open()
        self.input_name = self._session.get_inputs()[0].name

    def _open(self) -> Any:
        from onnxruntime.capi import onnxruntime_pybind11_state as state

        try:
            return optimised_session(self.path, self.digest, self.threads, providers(self.device))
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
    weights: Path, digest: str, module: torch.nn.Module, device: torch.device, threads: int = 0, int8: bool = False
) -> OnnxModule:
    """The ONNX export beside ``weights`` (sha256 ``digest``) as an ``OnnxModule`` (with ``int8``, its int8 export where
    there is one); one line naming the command when it is missing, or when it records other weights than these
    (exported before the weights were replaced)."""
    path = int8_file(weights) if int8 and int8_file(weights).is_file() else onnx_file(weights)
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
    if engine not in ENGINES:
        raise OnnxModelError(f"unknown engine {engine!r}: use one of {', '.join(ENGINES)}")
    runner = open_onnx(Path(weights), digest, module, device, threads, int8=engine == INT8_ENGINE)
    return runner, runner.digest
