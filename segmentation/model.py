"""The lesion U-Net (Ronneberger et al. 2015) from segmentation-models-pytorch, built by name, and its checkpoints."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch

from dermpipe.engine import hub
from dermpipe.engine.checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint
from dermpipe.engine.files import file_digest
from dermpipe.engine.packaged_weights import INSTALL_HINT, PACKAGES, PackagedWeightsError, packaged_weights
from dermpipe.errors import DermpipeError, did_you_mean
from dermpipe.segmentation.config import SegModelConfig

logger = logging.getLogger(__name__)

STAGE = "segmentation"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# a model.encoder_weights value ending so (or holding a path separator) is a local file, not a weights name
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin", ".tar", ".ckpt")


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
    source = "random initialisation (from scratch)"
    local = weights is not None and (os.sep in weights or weights.endswith(WEIGHT_FILE_SUFFIXES))
    timm_encoder = cfg.encoder.startswith("tu-")
    kwargs: dict[str, Any] = {}
    if cfg.architecture.lower() in ("unet", "unetplusplus"):
        kwargs["decoder_channels"] = list(cfg.decoder_channels)
        if cfg.decoder_attention:
            kwargs["decoder_attention_type"] = cfg.decoder_attention
    # what smp is given: a weights name, True for a tu- encoder (timm picks its default weights), or None
    encoder_weights: str | bool | None = None if local else weights
    timm_file: Path | None = None  # a local file that timm's own loader reads into a tu- encoder
    if local and timm_encoder:
        # read by timm into the timm model before smp keeps its feature stages (head dropped, formats and wrappers as
        # for a classifier): a plain timm or torchvision state dict fits, although it lacks smp's "model." prefix
        timm_file = _weights_file(Path(weights))
        encoder_weights = True
        kwargs["pretrained_cfg_overlay"] = {"file": str(timm_file)}
        source = f"the local file {timm_file.name} (sha256 {file_digest(timm_file)[:12]})"
    elif weights is not None and not local:
        if timm_encoder:
            encoder_weights = True  # smp warns about a name for a tu- encoder: the tag is part of the encoder name
        source = _hub_source(cfg.encoder, weights, kwargs)
    try:
        model = archs[cfg.architecture.lower()](
            encoder_name=cfg.encoder, encoder_weights=encoder_weights, classes=1, activation=None, **kwargs
        )
    except Exception as e:  # smp/timm raise many kinds when a download fails offline
        if timm_file is not None:
            raise ModelBuildError(
                f"cannot load encoder {cfg.encoder} weights from {timm_file} ({type(e).__name__}: {str(e)[:160]}); "
                "pass weights made for this timm model (a timm or torchvision state dict, .safetensors or .pth)"
            ) from None
        if weights and not local:
            raise ModelBuildError(
                _download_advice(weights, cfg.encoder, f"{type(e).__name__}: {str(e)[:120]}")
            ) from None
        raise
    if timm_file is not None and not hub.holds_weights_of(model.encoder, timm_file):
        # timm loads a feature extractor non-strictly: a file of another network would leave it random
        raise ModelBuildError(
            f"cannot load encoder {cfg.encoder} weights from {timm_file} (none of its weights fits this model); pass "
            "weights made for this timm model (a timm or torchvision state dict, .safetensors or .pth)"
        )
    if local and timm_file is None:
        _load_encoder_file(model, Path(weights))
        source = f"the local file {Path(weights).name} (sha256 {file_digest(_weights_file(Path(weights)))[:12]})"
    if weights is not None:
        logger.info("U-Net encoder %s: pretrained weights: %s", cfg.encoder, source)
    model.weights_source = source  # kept in the checkpoint (save_unet) and the model card
    return model


def _hub_source(encoder: str, weights: str, kwargs: dict[str, Any]) -> str:
    """Where a named encoder's weights come from (``kwargs`` set to match): the hub's cached copy or a download when
    its host answers; else, for a tu- encoder, an installed weights package (engine/packaged_weights.py); else one
    error naming the way forward."""
    download = _encoder_download(encoder, weights)
    # offline (HF_HUB_OFFLINE, or no answer from the weights' host) and not cached: fail now, not after retries
    why = hub.unreachable(download)
    timm_name = encoder.removeprefix("tu-")
    if not why:
        if encoder.startswith("tu-") and (overlay := hub.timm_cache_overlay(download)):
            kwargs["pretrained_cfg_overlay"] = overlay  # the cached copy as a local file: no network at all
            return f"{weights} weights ({timm_name}) from the local cache ({overlay['file']})"
        return f"{weights} weights ({timm_name}) from the hub"
    packaged = None
    if encoder.startswith("tu-") and weights == "imagenet":
        try:
            packaged = packaged_weights(timm_name)
        except PackagedWeightsError as e:
            raise ModelBuildError(_download_advice(weights, encoder, str(e))) from None
    if packaged is None:
        hint = f"; `{INSTALL_HINT}` brings them with no hub" if timm_name in PACKAGES else ""
        raise ModelBuildError(_download_advice(weights, encoder, why + hint))
    kwargs["pretrained_cfg_overlay"] = {"file": str(packaged.path)}
    return packaged.describe()


def encoder_normalisation(cfg: SegModelConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input mean and std the encoder's pretrained config asks for (a tu- encoder: timm's config, e.g. 0.5 for
    the TF-ported EfficientNet-Lites; an smp encoder: its weights' settings), ImageNet's when it names none."""
    if cfg.encoder.startswith("tu-"):
        import timm

        try:
            pretrained = timm.get_pretrained_cfg(cfg.encoder[3:])
        except RuntimeError:
            pretrained = None
        if pretrained is not None and pretrained.mean and pretrained.std:
            return tuple(map(float, pretrained.mean)), tuple(map(float, pretrained.std))
        return IMAGENET_MEAN, IMAGENET_STD
    settings = smp.encoders.encoders.get(cfg.encoder, {}).get("pretrained_settings", {})
    chosen = settings.get(cfg.encoder_weights or "imagenet") or next(iter(settings.values()), {})
    if chosen.get("mean") and chosen.get("std"):
        return tuple(map(float, chosen["mean"])), tuple(map(float, chosen["std"]))
    return IMAGENET_MEAN, IMAGENET_STD


def _download_advice(weights: str, encoder: str, why: str) -> str:
    return (
        f"cannot get {weights} weights for encoder {encoder} ({why}); offline? pass a local file with "
        "--set model.encoder_weights=PATH or train from scratch with --set model.encoder_weights=null"
    )


def _encoder_download(encoder: str, weights: str) -> hub.Download | None:
    """Where smp would fetch ``weights`` for ``encoder`` from: timm's source for a tu- encoder, the smp hub repository
    (its config.json and model.safetensors, both needed) or, with older smp, a URL. None for a name smp will refuse."""
    if encoder.startswith("tu-"):
        return hub.timm_download(encoder[3:])
    settings = smp.encoders.encoders.get(encoder, {}).get("pretrained_settings", {}).get(weights)
    if not settings:
        return None
    if "repo_id" in settings:
        revision = settings.get("revision")
        config = hub.hf_download(settings["repo_id"], "config.json", revision)
        state = hub.hf_download(settings["repo_id"], "model.safetensors", revision)
        # smp asks for both by commit hash: with both cached it reads them without a request
        return state if config.cached else hub.Download(state.url, None, hf=True)
    if settings.get("url"):
        return hub.url_download(settings["url"])
    return None


def _weights_file(path: Path) -> Path:
    path = path.expanduser()
    if not path.is_file():
        raise ModelBuildError(f"encoder weights file {path} not found")
    return path


def _load_encoder_file(model: torch.nn.Module, path: Path) -> None:
    """An smp encoder's weights from a state dict file (.safetensors, or a torch.save'd .pth/.pt/.bin whose
    tensors may sit under a "state_dict" or "model" key); a file that fits none of the encoder's keys is refused."""
    path = _weights_file(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt file, or a pickle that is more than tensors
        raise ModelBuildError(f"cannot read encoder weights file {path} ({type(e).__name__}: {str(e)[:160]})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelBuildError(f"encoder weights file {path} holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.encoder.state_dict()
    if not own.keys() & state.keys():
        raise ModelBuildError(
            f"encoder weights file {path} fits none of the {type(model.encoder).__name__}'s {len(own)} weights "
            f"(its keys look like {next(iter(state), 'nothing')!r}, the encoder's like {next(iter(own))!r}): pass "
            "weights made for this encoder, e.g. its smp-hub model.safetensors"
        )
    try:
        # the encoder's own loader first: smp's drop their classifier or rename old keys (DenseNet), then load strictly
        model.encoder.load_state_dict(dict(state))
        missing, unexpected = [], []
    except (RuntimeError, TypeError, KeyError):
        try:  # a partial fit: what matches (torch's loader, as some smp overrides take no strict=)
            missing, unexpected = torch.nn.Module.load_state_dict(model.encoder, state, strict=False)
        except RuntimeError as e:  # a shape that differs
            raise ModelBuildError(f"encoder weights file {path} does not fit the encoder: {str(e)[:300]}") from None
    if missing:
        logger.warning(
            "encoder weights from %s leave %d of the encoder's %d weights untouched (e.g. %s); %d keys unused",
            path,
            len(missing),
            len(own),
            missing[0],
            len(unexpected),
        )
    else:
        logger.info("encoder weights from %s (%d keys unused)", path, len(unexpected))


def save_unet(
    path: str | os.PathLike,
    model: torch.nn.Module,
    cfg: SegModelConfig,
    image_size: int,
    config_hash: str,
    extra: dict[str, Any] | None = None,
    normalisation: tuple[Sequence[float], Sequence[float]] | None = None,
) -> Path:
    """``normalisation``: the (mean, std) the model was trained with; default: what its encoder's config asks for."""
    mean, std = normalisation or encoder_normalisation(cfg)
    meta = {
        "stage": STAGE,
        "architecture": cfg.architecture,
        "encoder": cfg.encoder,
        "decoder_attention": cfg.decoder_attention or "",
        "decoder_channels": list(cfg.decoder_channels),
        "input_size": image_size,
        "mean": list(mean),
        "std": list(std),
        "weights_source": getattr(model, "weights_source", None),  # where training started
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
