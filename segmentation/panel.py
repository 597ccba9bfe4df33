"""The U-Net's validation panel: validation images with the predicted and true lesion contours (training writes it)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from dermpipe.data.loaders import decode_size, resize_square
from dermpipe.data.manifest import Manifest
from dermpipe.data.reading import read_image, read_mask, write_image
from dermpipe.segmentation.config import SegmentationConfig
from dermpipe.segmentation.lesion import clean_mask
from dermpipe.segmentation.prediction import predict_probabilities


def validation_panel(
    loaded: tuple[torch.nn.Module, dict], manifest: Manifest, cfg: SegmentationConfig, path: Path, device: torch.device
) -> Path:
    """A grid of validation images with the predicted (green) and true (red) lesion contours."""
    model, meta = loaded
    rows = manifest.rows[: cfg.train.panel_images]
    tiles = []
    size = int(meta["input_size"])
    for row in rows:
        image = resize_square(read_image(row["image_path"], max_side=decode_size(size)), size)
        prob = predict_probabilities(model, [image], meta["mean"], meta["std"], device)[0]
        pred = clean_mask(prob > cfg.predict.threshold)
        tile = image.copy()
        if row.get("mask_path"):
            truth = resize_square(read_mask(row["mask_path"]), size, nearest=True)
            contours, _ = cv2.findContours(truth.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(tile, contours, -1, (255, 0, 0), max(1, size // 128))
        contours, _ = cv2.findContours(pred.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(tile, contours, -1, (0, 255, 0), max(1, size // 128))
        tiles.append(tile)
    if not tiles:
        return path
    cols = min(4, len(tiles))
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    grid = np.vstack([np.hstack(tiles[i : i + cols]) for i in range(0, len(tiles), cols)])
    return write_image(path, grid)
