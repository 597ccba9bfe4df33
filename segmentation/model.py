"""The lesion U-Net (Ronneberger et al. 2015) from segmentation-models-pytorch, built by name, and its checkpoints."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch

from dermpipe.engine.checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint
from dermpipe.errors import DermpipeError, did_you_mean
from dermpipe.segmentation.config import SegModelConfig

logger = logging.getLogger(__name__)

STAGE = "segmentation"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelBuildError(DermpipeError):
    """An unknown architecture or encoder, or weights that cannot be had."""


def _architectures() -> dict[str, Any]:
    return dict(smp.MODEL_ARCHITECTURES_MAPPING)


def build_unet(cfg: SegModelConfig) -> torch.nn.Module:
    """A one-channel (lesion logit) smp model; ``encoder_weights``: ``imagenet``, a local file, or ``None``."""
    archs = _architectures()
    if cfg.architecture.lower() not in archs:
        hint = did_you_mean(cfg.architecture, archs)
        raise ModelBuildError(f"unknown architecture {cfg.architecture!r}{hint}; one of {', '.join(sorted(archs))}")
    encoders = smp.encoders.get_encoder_names()
    if not cfg.encoder.startswith("tu-") and cfg.encoder not in encoders:
        raise ModelBuildError(
            f"unknown encoder {cfg.encoder!r}{did_you_mean(cfg.encoder, encoders, n=5)}; any timm model works as "
            "'tu-<timm name>'"
        )
    weights = cfg.encoder_weights
    local = weights is not None and (os.sep in weights or weights.endswith((".pth", ".pt", ".safetensors", ".bin")))
    kwargs: dict[str, Any] = {}
    if cfg.architecture.lower() in ("unet", "unetplusplus"):
        kwargs["decoder_channels"] = list(cfg.decoder_channels)
        if cfg.decoder_attention:
            kwargs["decoder_attention_type"] = cfg.decoder_attention
    try:
        model = archs[cfg.architecture.lower()](
            encoder_name=cfg.encoder, encoder_weights=None if local else weights, classes=1, activation=None, **kwargs
        )
    except Exception as e:  # smp/timm raise many kinds when a download fails offline
        if weights and not local:
            raise ModelBuildError(
                f"cannot get {weights} weights for encoder {cfg.encoder} ({type(e).__name__}: {str(e)[:120]}); "
                "offline? pass a local file with --set model.encoder_weights=PATH or train from scratch with "
                "--set model.encoder_weights=null"
            ) from None
        raise
    if local:
        _load_encoder_file(model, Path(weights))
    return model


def _load_encoder_file(model: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ModelBuildError(f"encoder weights file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = model.encoder.load_state_dict(state, strict=False)
    logger.info("encoder weights from %s (%d missing, %d unexpected keys)", path, len(missing), len(unexpected))


def save_unet(
    path: str | os.PathLike,
    model: torch.nn.Module,
    cfg: SegModelConfig,
    image_size: int,
    config_hash: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    meta = {
        "stage": STAGE,
        "architecture": cfg.architecture,
        "encoder": cfg.encoder,
        "decoder_attention": cfg.decoder_attention or "",
        "decoder_channels": list(cfg.decoder_channels),
        "input_size": image_size,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "config_hash": config_hash,
        **(extra or {}),
    }
    return save_checkpoint(path, model, meta)


def load_unet(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the U-Net from a checkpoint's metadata; refuses a checkpoint of another stage."""
    state, meta = load_checkpoint(path, expect={"stage": STAGE})
    try:
        cfg = SegModelConfig(
            architecture=meta["architecture"],
            encoder=meta["encoder"],
            encoder_weights=None,
            decoder_attention=meta.get("decoder_attention") or None,
            decoder_channels=tuple(meta["decoder_channels"]),
        )
    except KeyError as e:
        raise CheckpointError(f"checkpoint {path} lacks metadata {e}; it was not written by this project") from None
    model = build_unet(cfg)
    load_weights(model, state, path)
    return model.to(device).eval(), meta
