"""Grad-CAM heatmaps (Selvaraju et al. 2017) on the SE-reweighted last feature map, overlaid on the lesion crop."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from dermpipe.classification.backbones import LesionClassifier
from dermpipe.classification.prediction import classifier_input, predict_probabilities
from dermpipe.data.preprocess import PreprocessConfig
from dermpipe.data.reading import write_image
from dermpipe.engine.files import write_text_atomic

logger = logging.getLogger(__name__)


def gradcam_overlays(
    model: LesionClassifier,
    images: Sequence[np.ndarray],
    target_classes: Sequence[int] | None = None,
    preprocess_cfg: PreprocessConfig | None = None,
    image_weight: float = 0.5,
) -> list[np.ndarray]:
    """One uint8 H x W x 3 overlay per uint8 RGB crop, at the crop's own size.

    The class map comes from the SE block's output (the last feature map the head sees; of a fold mean, the mean of
    its members' maps, each scaled to [0, 1], for the mean's output); ``target_classes`` picks
    the class explained per image (default: the predicted class). The map is computed at the model's input size and
    resized to each crop.
    """
    if target_classes is not None and len(target_classes) != len(images):
        raise ValueError(f"{len(target_classes)} target classes for {len(images)} images")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    overlays: list[np.ndarray] = []
    try:
        with GradCAM(model=model, target_layers=model.cam_layers()) as cam:
            for i, image in enumerate(images):
                # An input that needs grad keeps a graph even when every weight is frozen (a loaded model).
                batch = classifier_input(model, [image], preprocess_cfg).to(device).requires_grad_()
                targets = None if target_classes is None else [ClassifierOutputTarget(int(target_classes[i]))]
                with torch.enable_grad():
                    heat = cam(input_tensor=batch, targets=targets)[0]
                height, width = image.shape[:2]
                heat = cv2.resize(heat.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
                rgb = image.astype(np.float32) / 255.0
                overlays.append(show_cam_on_image(rgb, np.clip(heat, 0, 1), use_rgb=True, image_weight=image_weight))
    finally:
        model.zero_grad(set_to_none=True)  # the backward passes must not leak into a later optimiser step
        model.train(was_training)
    return overlays


def save_gradcam_images(
    model: LesionClassifier,
    images: Sequence[np.ndarray],
    ids: Sequence[str],
    out_dir: str | os.PathLike,
    classes: Sequence[str],
    labels: Sequence[str] | None = None,
    preprocess_cfg: PreprocessConfig | None = None,
) -> list[Path]:
    """``<out_dir>/<image_id>_pred-<class>[_true-<class>].png``: each crop beside its Grad-CAM overlay. Overlays
    left from an earlier call (another model, other images) are removed: the folder shows one model."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    probs = predict_probabilities(model, images, preprocess_cfg=preprocess_cfg, desc="grad-cam")
    predicted = probs.argmax(axis=1)
    overlays = gradcam_overlays(model, images, predicted.tolist(), preprocess_cfg)
    paths = []
    for i, (image, overlay) in enumerate(zip(images, overlays)):
        truth = f"_true-{labels[i]}" if labels is not None and labels[i] else ""
        path = out_dir / f"{ids[i]}_pred-{classes[predicted[i]]}{truth}.png"
        panel = np.concatenate([image, overlay], axis=1)
        paths.append(write_image(path, panel))
    for old in set(out_dir.glob("*.png")) - set(paths):  # another model's (or image's) overlay: never mixed in
        old.unlink(missing_ok=True)
    logger.info("wrote %d Grad-CAM overlays to %s", len(paths), out_dir)
    return paths


WEIGHTS_MARKER = "weights.sha256"  # in gradcam/: the digest of the checkpoint its overlays were drawn from


def refresh_gradcam(
    model: LesionClassifier,
    images: Sequence[np.ndarray],
    image_ids: Sequence[str],
    labels: Sequence[str],
    classes: Sequence[str],
    folder: Path,
    digest: str,
    preprocess_cfg: PreprocessConfig | None = None,
) -> None:
    """A training run's Grad-CAM overlays of ``images`` into ``folder``, marked with the digest of the weights they
    were drawn from; another model's overlays are removed first, never left beside these (no images: only that)."""
    marker = folder / WEIGHTS_MARKER
    if marker.is_file() and marker.read_text().strip() != digest:
        for old in folder.glob("*.png"):
            old.unlink()
        marker.unlink()
    if len(images):
        save_gradcam_images(model, images, image_ids, folder, classes, labels, preprocess_cfg)
        write_text_atomic(marker, digest + "\n")
