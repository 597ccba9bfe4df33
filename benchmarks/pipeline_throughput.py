"""Batch prediction throughput (BENCHMARKS.md): the whole pipeline against the bare forward passes of its networks.

    python benchmarks/pipeline_throughput.py --images 32 --batch 16

Builds every stage with random weights at its real input size (the U-Net at ``--seg-size``, the five default backbones
at their native sizes), writes synthetic 512 px JPEGs, and times (1) the sum of the six networks' bare forward passes
on the same batches, (2) ``ensemble/predict.py``'s path from a cold cache, (3) a rerun from the warm cache.
``--json FILE`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import torch

from dermpipe.classification.backbones import DEFAULT_BACKBONES, build_classifier, checkpoint_metadata
from dermpipe.classification.ood import OOD_FILE, fit_ood
from dermpipe.configs.schema import RunConfig
from dermpipe.data.generator import make_sample
from dermpipe.data.listing import manifest_from_folder
from dermpipe.engine.checkpoint import save_checkpoint
from dermpipe.engine.files import file_digest, write_text_atomic
from dermpipe.engine.run import save_config
from dermpipe.ensemble.meta import LocallyConnectedVote, save_meta
from dermpipe.predict.batch import predict_folder
from dermpipe.predict.config import PredictConfig, PredictOutputs
from dermpipe.predict.predictor import EnsemblePredictor
from dermpipe.segmentation.config import SegDataConfig, SegmentationConfig, SegModelConfig, SegPredictConfig
from dermpipe.segmentation.model import build_unet, save_unet

CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _bare_seconds(model: torch.nn.Module, size: int, n: int, batch: int, device: torch.device) -> float:
    model.eval().to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    model(x[:2])  # warm-up
    _sync(device)
    start = time.perf_counter()
    for i in range(0, n, batch):
        model(x[: min(batch, n - i)])
    _sync(device)
    seconds = time.perf_counter() - start
    model.cpu()
    return seconds


@torch.inference_mode()
def _write_ood(model: torch.nn.Module, folder: Path) -> None:
    """Out-of-distribution statistics beside a random-weight classifier, fitted on its features of random inputs:
    prediction then pays for the check as it does with a trained backbone."""
    model.eval()
    size = model.input_size
    _, features = model.forward_with_features(torch.randn(2 * len(CLASSES), 3, size, size))
    labels = np.arange(len(features)) % len(CLASSES)
    stats = fit_ood(features.numpy(), labels, weights_digest=file_digest(folder / "best.safetensors"))
    stats.save(folder / OOD_FILE)


def _decode_seconds(photos: Path) -> float:
    """Decoding every photo once in one process: the part of the pipeline's time the networks cannot hide."""
    from dermpipe.data.reading import read_image

    start = time.perf_counter()
    for path in sorted(photos.iterdir()):
        read_image(path)
    return time.perf_counter() - start


def run(
    n_images: int, batch: int, seg_size: int, encoder: str, backbones: list[str], device: torch.device
) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        seg_model = SegModelConfig(encoder=encoder, encoder_weights=None)
        predict = SegPredictConfig(tta=False, batch_size=batch)
        seg_cfg = SegmentationConfig(data=SegDataConfig(image_size=seg_size), model=seg_model, predict=predict)
        unet = build_unet(seg_model)
        save_unet(root / "seg" / "best.safetensors", unet, seg_model, seg_size, "bench")
        save_config(seg_cfg, root / "seg" / "config.yaml")
        bare = _bare_seconds(unet, seg_size, n_images, batch, device)
        for name in backbones:
            model = build_classifier(name, len(CLASSES), False)
            save_checkpoint(root / "cls" / name / "best.safetensors", model, checkpoint_metadata(model, CLASSES))
            _write_ood(model, root / "cls" / name)
            bare += _bare_seconds(model, model.input_size, n_images, batch, device)
        save_meta(
            root / "ens" / "meta.safetensors",
            LocallyConnectedVote(len(backbones), len(CLASSES), 20),
            CLASSES,
            backbones,
        )
        rng = np.random.default_rng(0)
        photos = root / "photos"
        photos.mkdir()
        for i in range(n_images):
            image, _ = make_sample(rng, "nv", 512)
            cv2.imwrite(str(photos / f"photo_{i:04d}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        cfg = PredictConfig(
            segmentation_run=str(root / "seg"),
            classification_root=str(root / "cls"),
            ensemble_run=str(root / "ens"),
            batch_size=batch,
            outputs=PredictOutputs(report=False),
            run=RunConfig(out_dir=str(root / "out"), cache_dir=str(root / "cache")),
        )
        manifest = manifest_from_folder(photos)
        decode = _decode_seconds(photos)
        # time to first prediction: every stage loaded, then one photo through, from a cache of its own
        start = time.perf_counter()
        first_cfg = replace(cfg, run=replace(cfg.run, cache_dir=str(root / "cache_first")))
        one = replace(manifest, rows=manifest.rows[:1])
        predict_folder(one, EnsemblePredictor(first_cfg, device), root / "first" / "p.csv", root / "first")
        _sync(device)
        first = time.perf_counter() - start
        times = []
        for _ in range(2):
            predictor = EnsemblePredictor(cfg, device)
            start = time.perf_counter()
            predict_folder(manifest, predictor, root / "out" / "predictions.csv", root / "out")
            _sync(device)
            times.append(time.perf_counter() - start)
    cold, warm = times
    return {
        "images": n_images,
        "bare_img_s": n_images / bare,
        "pipeline_img_s": n_images / cold,
        "overhead": cold / bare - 1,
        "ratio_to_floor": bare / cold,
        "decode_share": decode / cold,
        "first_prediction_s": first,
        "device": str(device),
        "warm_img_s": n_images / warm,
        "warm_speedup": cold / warm,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seg-size", type=int, default=256)
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--backbones", default=",".join(DEFAULT_BACKBONES))
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    r = run(args.images, args.batch, args.seg_size, args.encoder, args.backbones.split(","), device)
    print(
        f"{r['images']} images: pipeline {r['pipeline_img_s']:.2f} img/s, sum of bare forwards "
        f"{r['bare_img_s']:.2f} img/s, overhead {100 * r['overhead']:.1f}%; warm cache {r['warm_img_s']:.1f} img/s "
        f"({r['warm_speedup']:.0f}x); decoding alone {100 * r['decode_share']:.0f}% of the pipeline's time"
    )
    if args.json:
        settings = {"batch": args.batch, "seg_size": args.seg_size, "encoder": args.encoder}
        settings["backbones"] = args.backbones.split(",")
        write_text_atomic(Path(args.json), json.dumps({**settings, **r}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
