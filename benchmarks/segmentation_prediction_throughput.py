"""Segmentation prediction throughput (BENCHMARKS.md): the stage's whole prediction path against the bare forward pass.

    python benchmarks/segmentation_prediction_throughput.py --size 256 --images 64 --batch 16

Writes ``--images`` synthetic 512 px JPEGs, builds the U-Net (``--encoder``, random weights) at ``--size``, and times
(1) its bare forward pass on the same batches, (2) the stage's prediction path from a cold cache (decode, resize,
forward, post-process, crop, cache write), (3) a rerun from the warm cache. ``--json FILE`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from dermpipe.data.generator import make_sample
from dermpipe.engine.files import write_text_atomic
from dermpipe.segmentation.config import SegmentationConfig, SegModelConfig, SegPredictConfig
from dermpipe.segmentation.model import IMAGENET_MEAN, IMAGENET_STD, build_unet, save_unet
from dermpipe.segmentation.prediction import SegmentationPredictor, predict_probabilities


def throughput(size: int, n_images: int, batch: int, encoder: str, threads: int) -> dict[str, float]:
    """Images per second of the whole prediction path (decode, resize, forward, post-process, crop, cache write) next
    to the bare forward pass of the same U-Net on the same batches."""
    if threads:
        torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = []
        for i in range(n_images):
            image, _ = make_sample(rng, "nv", 512)
            path = folder / f"img_{i:04d}.jpg"
            cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            paths.append(path)
        model_cfg = SegModelConfig(encoder=encoder, encoder_weights=None)
        model = build_unet(model_cfg).eval()
        ckpt = save_unet(folder / "unet.safetensors", model, model_cfg, size, "bench")
        cfg = SegmentationConfig(model=model_cfg, predict=SegPredictConfig(tta=False, batch_size=batch, crop_size=224))
        predictor = SegmentationPredictor(ckpt, cfg, torch.device("cpu"), folder / "cache")
        x = [np.zeros((size, size, 3), np.uint8)] * batch
        predict_probabilities(predictor.model, x, IMAGENET_MEAN, IMAGENET_STD, torch.device("cpu"))  # warm-up
        start = time.perf_counter()
        for i in range(0, n_images, batch):
            predict_probabilities(
                predictor.model, x[: min(batch, n_images - i)], IMAGENET_MEAN, IMAGENET_STD, torch.device("cpu")
            )
        bare = time.perf_counter() - start
        start = time.perf_counter()
        results = list(predictor.crop((p.stem, str(p)) for p in paths))
        full = time.perf_counter() - start
        start = time.perf_counter()
        list(predictor.crop((p.stem, str(p)) for p in paths))
        warm = time.perf_counter() - start
    assert len(results) == n_images
    return {
        "images": n_images,
        "size": size,
        "bare_forward_img_s": n_images / bare,
        "pipeline_img_s": n_images / full,
        "overhead": full / bare - 1,
        "warm_cache_img_s": n_images / warm,
        "warm_speedup": full / warm,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    r = throughput(args.size, args.images, args.batch, args.encoder, args.threads)
    print(
        f"U-Net {args.encoder} at {r['size']} px on {r['images']} images: pipeline {r['pipeline_img_s']:.2f} "
        f"img/s, bare forward {r['bare_forward_img_s']:.2f} img/s, overhead {100 * r['overhead']:.1f}%; "
        f"warm cache {r['warm_cache_img_s']:.1f} img/s ({r['warm_speedup']:.0f}x)"
    )
    if args.json:
        write_text_atomic(Path(args.json), json.dumps({"encoder": args.encoder, **r}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
