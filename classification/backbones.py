"""Backbone registry and the lesion classifier: a timm CNN, a Squeeze-and-Excitation block (Hu et al. 2018), a head."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import resolve_model_data_config
from torch import nn

from dermpipe.engine import hub
from dermpipe.engine.checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint
from dermpipe.engine.files import file_digest
from dermpipe.engine.packaged_weights import INSTALL_HINT, PACKAGES, PackagedWeightsError, packaged_weights
from dermpipe.errors import DermpipeError, did_you_mean

logger = logging.getLogger(__name__)

STAGE = "classification"


class BackboneError(DermpipeError):
    """A backbone name that neither the registry nor timm knows, or one that gives no convolutional feature map."""


@dataclass(frozen=True)
class BackboneSpec:
    """A registry entry: the timm model, its native square input size, and the smallest size its stem accepts."""

    timm_name: str
    input_size: int
    min_input_size: int = 32


# The five backbones of the ensemble at their native input sizes. "xception" is timm's ``legacy_xception``: the
# original Xception of Chollet (2017) as released with Keras (ported weights), which is what the dermoscopy ensembles
# built on Keras used; timm's ``xception41/65/71`` are the deeper "aligned" variants from DeepLab v3+.
BACKBONES: dict[str, BackboneSpec] = {
    "resnet50": BackboneSpec("resnet50", 224),
    "densenet169": BackboneSpec("densenet169", 224),
    "inception_v3": BackboneSpec("inception_v3", 299, min_input_size=75),
    "inception_resnet_v2": BackboneSpec("inception_resnet_v2", 299, min_input_size=75),
    "xception": BackboneSpec("legacy_xception", 299),
}
DEFAULT_BACKBONES: tuple[str, ...] = tuple(BACKBONES)
# The tiny timm model the tests and the demo use (a few thousand parameters, any input size from 32 px).
TEST_BACKBONE = "test_resnet"


def resolve_backbone(name: str) -> BackboneSpec:
    """The registry entry for ``name``, or an entry for any timm model name (input size from timm's config).

    An unknown name raises ``BackboneError`` listing the closest registry and timm names.
    """
    if name in BACKBONES:
        return BACKBONES[name]
    if timm.is_model(name):
        cfg = timm.get_pretrained_cfg(name)
        size = int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224
        return BackboneSpec(name, size)
    choices = list(dict.fromkeys([*BACKBONES, *timm.list_models()]))
    raise BackboneError(
        f"unknown backbone {name!r}{did_you_mean(name, choices, n=5)}: use one of {', '.join(BACKBONES)} or any "
        "name from timm.list_models()"
    )


class SEBlock(nn.Module):
    """Squeeze-and-Excitation (Hu et al. 2018): reweight channels by a gate computed from their global averages."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.squeeze = nn.AdaptiveAvgPool2d(1)
        self.excite = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.excite(self.squeeze(x).flatten(1))
        return x * gate[:, :, None, None]


def _weights_error(spec: BackboneSpec, source: str, why: str) -> CheckpointError:
    return CheckpointError(
        f"could not load pretrained weights for {spec.timm_name} from {source} ({why}); "
        "set model.pretrained to false, or to a local weights file made for this model"
    )


def _hub_or_package(spec: BackboneSpec, kwargs: dict[str, Any]) -> str:
    """Set ``kwargs`` for ImageNet weights with no local file given; returns where they come from. timm's hub first
    (its cached copy as a local file, else a download when the host answers), then an installed weights package
    (engine/packaged_weights.py); otherwise one error that names the way forward."""
    download = hub.timm_download(spec.timm_name)
    why = hub.unreachable(download)
    if not why:
        overlay = hub.timm_cache_overlay(download)
        if overlay:
            kwargs["pretrained_cfg_overlay"] = overlay
            return f"timm's ImageNet weights ({spec.timm_name}) from the local cache ({overlay['file']})"
        return f"timm's ImageNet weights ({spec.timm_name}) from the hub"
    try:
        packaged = packaged_weights(spec.timm_name)
    except PackagedWeightsError as e:
        raise _weights_error(spec, "its installed weights package", str(e)) from None
    if packaged is None:
        hint = f"; `{INSTALL_HINT}` brings them with no hub" if spec.timm_name in PACKAGES else ""
        if f"tf_{spec.timm_name}" in PACKAGES:
            hint = f"; tf_{spec.timm_name} has ImageNet weights with no hub (`{INSTALL_HINT}`)"
        raise _weights_error(spec, "timm's download", why + hint)
    kwargs["pretrained_cfg_overlay"] = {"file": str(packaged.path)}
    return packaged.describe()


def _create_backbone(spec: BackboneSpec, pretrained: bool | str) -> tuple[nn.Module, str]:
    """The headless timm backbone, and where its weights came from (logged, and kept in the checkpoint)."""
    kwargs: dict[str, Any] = {"num_classes": 0, "global_pool": "", "pretrained": bool(pretrained)}
    source = "random initialisation (from scratch)"
    if isinstance(pretrained, str) and pretrained:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise CheckpointError(
                f"pretrained weights file {path} not found: pass an existing .safetensors/.pth file, "
                "true for timm's download, or false"
            )
        # timm's own loader reads safetensors, or a .pth with weights_only=True, then drops the classifier.
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
        source = f"the local file {path.name} (sha256 {file_digest(path)[:12]})"
    elif pretrained:
        # offline (HF_HUB_OFFLINE, or no answer from the weights' host) and not cached: an installed weights package,
        # or one error now rather than a minute of retries
        source = _hub_or_package(spec, kwargs)
    try:
        backbone = timm.create_model(spec.timm_name, **kwargs)
    except (RuntimeError, ValueError, OSError, KeyError) as e:
        if not kwargs["pretrained"]:
            raise
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _weights_error(spec, source, first) from None
    # timm loads a headless model non-strictly: a file of another network would leave every weight random
    if isinstance(pretrained, str) and pretrained and not hub.holds_weights_of(backbone, pretrained):
        raise _weights_error(spec, source, "none of its weights fits this model")
    if pretrained:
        logger.info("%s: pretrained weights: %s", spec.timm_name, source)
    return backbone, source


def _map_channels(backbone: nn.Module, name: str, spec: BackboneSpec) -> int:
    """The channel count of ``backbone``'s output feature map, from one forward pass on a blank image.

    Tried at a small size first (convolutional networks take any size above their minimum), then at the native one
    (vision transformers take only that). A network that gives tokens instead of a B x C x H x W map is refused.
    """
    was_training = backbone.training
    backbone.eval()
    sizes = dict.fromkeys((max(spec.min_input_size, 64), spec.input_size))
    try:
        for size in sizes:
            try:
                with torch.no_grad():
                    out = backbone(torch.zeros(1, 3, size, size))
            except (RuntimeError, AssertionError, ValueError) as e:
                failure = e
                continue
            if out.ndim != 4:
                raise BackboneError(
                    f"backbone {name!r} gives a {out.ndim}-d output of shape {tuple(out.shape)} (tokens), not a "
                    "B x C x H x W feature map: the SE block and Grad-CAM here need a convolutional network "
                    "(e.g. convnext_*, efficientnet_*, resnet*, mobilenetv3_*)"
                )
            return int(out.shape[1])
        raise BackboneError(f"backbone {name!r} takes no blank {spec.input_size} px image: {failure}")
    finally:
        backbone.train(was_training)


class LesionClassifier(nn.Module):
    """timm backbone feature map -> SE block -> global average pool -> dropout -> linear head (logits)."""

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        pretrained: bool | str = False,
        drop_rate: float = 0.3,
        se_reduction: int = 16,
    ) -> None:
        super().__init__()
        spec = resolve_backbone(backbone)
        self.backbone_name = backbone
        self.timm_name = spec.timm_name
        self.num_classes = num_classes
        self.min_input_size = spec.min_input_size
        self.se_reduction = se_reduction
        self.backbone_frozen = False
        self.batchnorm_held = False
        self.backbone, self.weights_source = _create_backbone(spec, pretrained)
        # the channels of what the backbone really gives (MobileNetV3 and GhostNet put a 1x1 conv after
        # num_features), not timm's num_features
        channels = _map_channels(self.backbone, backbone, spec)
        # se_reduction 0 leaves the SE block out: an ablation, to measure what the block adds.
        self.se = SEBlock(channels, se_reduction) if se_reduction else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.head = nn.Linear(channels, num_classes)
        config = resolve_model_data_config(self.backbone)
        self.data_config: dict[str, Any] = {
            "input_size": spec.input_size,
            "mean": tuple(float(v) for v in config["mean"]),
            "std": tuple(float(v) for v in config["std"]),
            "interpolation": config.get("interpolation", "bilinear"),
        }
        # The square side the model is trained and run at; the training code may set another (data.image_size).
        self.input_size = spec.input_size

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The SE-reweighted last feature map (B x C x h x w): what the pooling sees and Grad-CAM explains."""
        fmap = self.backbone(x)
        if fmap.ndim != 4:
            raise BackboneError(
                f"backbone {self.backbone_name!r} gives a {fmap.ndim}-d output, not a B x C x H x W feature map: "
                "the SE block needs a convolutional network"
            )
        return self.se(fmap)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, pooled features B x C): the vector the head reads, which the out-of-distribution check scores."""
        pooled = self.pool(self.features(x)).flatten(1)
        return self.head(self.dropout(pooled)), pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[0]

    def cam_layers(self) -> list[nn.Module]:
        """The layers Grad-CAM explains: the SE block's output."""
        return [self.se]

    def hold_batchnorm(self, hold: bool) -> None:
        """Keep the backbone's BatchNorm layers in eval mode (their running statistics, not the batch's) while the rest
        trains: ``train.batchnorm: frozen``. Their scale and shift still learn."""
        self.batchnorm_held = hold

    def set_backbone_trainable(self, trainable: bool) -> None:
        """Freeze or unfreeze the backbone; a frozen backbone also keeps its BatchNorm statistics (eval mode)."""
        for p in self.backbone.parameters():
            p.requires_grad_(trainable)
        self.backbone_frozen = not trainable

    def train(self, mode: bool = True) -> LesionClassifier:
        super().train(mode)
        if mode and self.backbone_frozen:
            self.backbone.eval()
        elif mode and self.batchnorm_held:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self


class FoldMeanClassifier(nn.Module):
    """The K fold models of one backbone as one classifier (``train.fold_models: mean``).

    Its output is the log of the mean of the members' softmax probabilities: logits whose softmax is that mean, so
    prediction, TTA, the probability cache, Grad-CAM (the mean of the members' maps) and the ONNX export take it as
    they take one ``LesionClassifier``. The members share backbone, classes, input size and normalisation.
    """

    def __init__(self, members: list[LesionClassifier]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"a fold mean needs at least 2 models, got {len(members)}")
        first = members[0]
        for m in members[1:]:
            if (m.backbone_name, m.num_classes, m.input_size) != (first.backbone_name, first.num_classes,
                                                                  first.input_size):  # fmt: skip
                raise ValueError("the fold models differ in backbone, classes or input size")
        self.members = nn.ModuleList(members)
        self.backbone_name, self.timm_name = first.backbone_name, first.timm_name
        self.num_classes, self.min_input_size = first.num_classes, first.min_input_size
        self.se_reduction, self.input_size = first.se_reduction, first.input_size
        self.data_config = dict(first.data_config)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the mean's logits, the members' pooled features side by side: B x K*C)."""
        outputs = [m.forward_with_features(x) for m in self.members]
        log_probs = torch.stack([torch.log_softmax(logits.float(), dim=1) for logits, _ in outputs])
        mean = torch.logsumexp(log_probs, dim=0) - math.log(len(self.members))
        return mean, torch.cat([pooled for _, pooled in outputs], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[0]

    def cam_layers(self) -> list[nn.Module]:
        return [layer for m in self.members for layer in m.cam_layers()]


def build_classifier(
    backbone: str,
    num_classes: int,
    pretrained: bool | str = False,
    drop_rate: float = 0.3,
    se_reduction: int = 16,
) -> LesionClassifier:
    """A ``LesionClassifier`` for a registry name or any timm model name.

    ``pretrained``: ``True`` uses timm's download, a string is a local weights file, ``False`` starts from random
    weights. Normalisation and native input size are in ``model.data_config`` (from timm, never hard-coded).
    """
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    return LesionClassifier(backbone, num_classes, pretrained, drop_rate, se_reduction)


def checkpoint_metadata(model: LesionClassifier, classes: tuple[str, ...] | list[str], **extra: Any) -> dict[str, Any]:
    """What ``load_classifier`` needs to rebuild ``model``, plus ``extra`` items (config hash, epoch, score...)."""
    return {
        "stage": STAGE,
        "backbone": model.backbone_name,
        "timm_name": model.timm_name,
        "classes": list(classes),
        "input_size": int(model.input_size),
        "mean": list(model.data_config["mean"]),
        "std": list(model.data_config["std"]),
        "drop_rate": float(model.dropout.p),
        "se_reduction": int(model.se_reduction),
        "weights_source": getattr(model, "weights_source", None),  # where training started (ImageNet or scratch)
        **extra,
    }


def load_classifier(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[LesionClassifier | FoldMeanClassifier, dict[str, Any]]:
    """Rebuild a trained classifier from its checkpoint (in eval mode); a checkpoint of another stage is refused.
    A checkpoint with ``fold_models: K`` in its metadata is the mean of K fold models (``FoldMeanClassifier``)."""
    state, meta = load_checkpoint(path, expect={"stage": STAGE})
    missing = [k for k in ("backbone", "classes", "input_size", "mean", "std") if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)} in its metadata: retrain the classifier")
    classes = meta["classes"]
    reduction = int(meta.get("se_reduction", 16))
    models = []
    for _ in range(int(meta.get("fold_models") or 1)):
        model = build_classifier(meta["backbone"], len(classes), False, float(meta.get("drop_rate", 0.0)), reduction)
        model.input_size = int(meta["input_size"])
        model.data_config = {
            **model.data_config,
            "input_size": model.input_size,
            "mean": tuple(meta["mean"]),
            "std": tuple(meta["std"]),
        }
        models.append(model)
    loaded: LesionClassifier | FoldMeanClassifier = models[0] if len(models) == 1 else FoldMeanClassifier(models)
    load_weights(loaded, state, path)
    loaded.to(device).eval()
    return loaded, meta


def save_fold_mean(path: str | os.PathLike, fold_paths: list[Path], digests: list[str], **extra: Any) -> Path:
    """One checkpoint holding the K fold models of ``fold_paths`` as a ``FoldMeanClassifier``: the first fold's
    metadata (backbone, classes, size, normalisation, preprocessing, crops), ``fold_models: K``, the fold weights'
    ``digests`` (``weights_digest`` of each path, which the caller has already computed) and ``extra``."""
    models, metas = zip(*(load_classifier(p) for p in fold_paths))
    for p, m in zip(fold_paths[1:], metas[1:]):
        for key in ("backbone", "classes", "input_size", "mean", "std", "se_reduction", "preprocess", "crops"):
            if m.get(key) != metas[0].get(key):
                raise CheckpointError(
                    f"fold models {fold_paths[0]} and {p} differ in {key} ({metas[0].get(key)!r} vs "
                    f"{m.get(key)!r}): retrain the folds with the same settings"
                )
    meta = {k: v for k, v in metas[0].items() if k not in ("fold", "epoch", "val_balanced_accuracy", "trained_on")}
    meta.update({"fold_models": len(models), "fold_weights": list(digests), **extra})
    return save_checkpoint(path, FoldMeanClassifier(list(models)), meta)
