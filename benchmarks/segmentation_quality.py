"""Segmentation quality on a real ISIC sample (BENCHMARKS.md): its manifest, ISIC scores of predicted masks, and
the scores of prediction-time variants.

python benchmarks/segmentation_quality.py manifest --root ../shared/data/isic_real --out runs/bench/isic_real.csv
python benchmarks/segmentation_quality.py score --manifest runs/bench/isic_seg_3000.csv --split test --pred DIR/masks
python benchmarks/segmentation_quality.py variants --run runs/bench/RUN --manifest runs/bench/isic_seg_3000.csv

Prediction throughput is ``benchmarks/segmentation_prediction_throughput.py``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from dermpipe.data.loaders import decode_size, resize_square
from dermpipe.data.manifest import Manifest
from dermpipe.data.reading import read_image
from dermpipe.segmentation.lesion import clean_mask
from dermpipe.segmentation.model import load_unet
from dermpipe.segmentation.prediction import full_probability, predict_probabilities

logger = logging.getLogger(__name__)


def real_sample_manifest(root: Path, out: Path, train_images: int = 0, val_images: int = 0, seed: int = 0) -> Path:
    """A manifest of the real sample (``images/``, ``masks/``, ``labels.csv`` with its grouped split), optionally with
    a random subset of ``train_images`` training and ``val_images`` validation rows (test is always whole)."""
    rows = []
    with open(root / "labels.csv", newline="") as f:
        for r in csv.DictReader(f):
            mask = root / "masks" / f"{r['image_id']}_segmentation.png"
            rows.append(
                {
                    "image_id": r["image_id"],
                    "image_path": str((root / "images" / f"{r['image_id']}.jpg").resolve()),
                    "mask_path": str(mask.resolve()) if mask.is_file() else "",
                    "label": r["dx"],
                    "group": r["group"],
                    "split": r["split"],
                    "dataset": r["dataset"],
                }
            )
    rng = np.random.default_rng(seed)
    keep = []
    for split, limit in (("train", train_images), ("val", val_images), ("test", 0)):
        part = [r for r in rows if r["split"] == split]
        if limit and limit < len(part):
            part = [part[i] for i in sorted(rng.choice(len(part), limit, replace=False))]
        keep.extend(part)
    classes = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    return Manifest(rows=tuple(keep), classes=classes, info={"source": "isic_real sample"}).write(out)


def _convex_hull(mask: np.ndarray) -> np.ndarray:
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = np.zeros_like(mask)
    if contours:
        cv2.fillPoly(out, [cv2.convexHull(np.concatenate(contours))], 1)
    return out


def _morph(mask: np.ndarray, op: int, fraction: float) -> np.ndarray:
    side = max(3, int(fraction * min(mask.shape[:2])) | 1)
    return cv2.morphologyEx(mask, op, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side)))


def mask_variants(run: Path, manifest: Path, split: str, sizes: Sequence[int]) -> dict[str, dict[str, float]]:
    """Mean ISIC scores of one trained U-Net's masks (flip TTA) under prediction-time variants: other input sizes
    alone and averaged with the first, and on the first size other thresholds and shapes of the cleaned mask.
    Meant for the validation split: a variant is worth adopting only if it wins there."""
    from dermpipe.segmentation.metrics import image_scores, mean_scores, read_mask

    device = torch.device("cpu")
    model, meta = load_unet(run / "best.safetensors", device)
    per_image: dict[str, list[dict[str, float]]] = {}
    for row in Manifest.read(manifest).select(split).rows:
        truth = read_mask(Path(row["mask_path"]))
        h, w = truth.shape[:2]
        image = read_image(row["image_path"], max_side=decode_size(max(sizes)))
        probs = []
        for size in sizes:
            view = [resize_square(image, size)]
            (prob,) = predict_probabilities(model, view, meta["mean"], meta["std"], device, tta=True)
            stored = np.round(prob * 255).astype(np.uint8)  # as the crop cache keeps it, and written masks use it
            probs.append(full_probability(stored, h, w).astype(np.float32) / 255)
        base = clean_mask(probs[0] > 0.5)
        masks = {f"size {sizes[0]}": base}
        for size, prob in zip(sizes[1:], probs[1:]):
            masks[f"size {size}"] = clean_mask(prob > 0.5)
            masks[f"mean of sizes {sizes[0]} and {size}"] = clean_mask((probs[0] + prob) / 2 > 0.5)
        for t in (0.4, 0.45, 0.55, 0.6):
            masks[f"threshold {t}"] = clean_mask(probs[0] > t)
        masks["convex hull"] = _convex_hull(base)
        masks["closing 2%"] = clean_mask(_morph(base, cv2.MORPH_CLOSE, 0.02))
        masks["opening 2%"] = clean_mask(_morph(base, cv2.MORPH_OPEN, 0.02))
        masks["dilation 1%"] = _morph(base, cv2.MORPH_DILATE, 0.01)
        masks["erosion 1%"] = _morph(base, cv2.MORPH_ERODE, 0.01)
        for name, mask in masks.items():
            per_image.setdefault(name, []).append(image_scores(mask * 255, truth))
    return {name: mean_scores(scores) for name, scores in per_image.items()}


def paired_differences(a: Sequence[dict[str, float]], b: Sequence[dict[str, float]], samples: int = 2000,
                       seed: int = 0) -> dict[str, list[float]]:  # fmt: skip
    """Per metric, the mean per-image difference ``a - b`` on the same images and its 95% bootstrap interval
    (images resampled with replacement, both masks of an image together)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(a), size=(samples, len(a)))
    out = {}
    for metric in a[0]:
        diff = np.array([x[metric] - y[metric] for x, y in zip(a, b)])
        low, high = np.quantile(diff[draws].mean(axis=1), [0.025, 0.975])
        out[f"{metric}_difference"] = [float(diff.mean()), float(low), float(high)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("manifest", help="manifest of the real sample")
    m.add_argument("--root", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--train-images", type=int, default=0)
    m.add_argument("--val-images", type=int, default=0)
    m.add_argument("--seed", type=int, default=0)
    sc = sub.add_parser("score", help="ISIC scores of predicted masks for one split of a manifest")
    sc.add_argument("--manifest", required=True)
    sc.add_argument("--pred", required=True, help="folder of <image_id>_segmentation.png")
    sc.add_argument("--split", default="test")
    sc.add_argument("--json", help="also write the means to this JSON file")
    sc.add_argument("--against", help="a second folder of masks: the paired difference (--pred minus it) per metric")
    v = sub.add_parser("variants", help="scores of prediction-time variants (input sizes, thresholds, mask shapes)")
    v.add_argument("--run", required=True, help="trained segmentation run folder (its best.safetensors)")
    v.add_argument("--manifest", required=True)
    v.add_argument("--split", default="val")
    v.add_argument("--sizes", default="128,160,192", help="input sizes, the trained size first")
    v.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "variants":
        if args.threads:
            torch.set_num_threads(args.threads)
        sizes = [int(x) for x in args.sizes.split(",")]
        for name, m in mask_variants(Path(args.run), Path(args.manifest), args.split, sizes).items():
            print(f"{name:28s} jaccard {m['jaccard']:.4f}, thresholded_jaccard {m['thresholded_jaccard']:.4f}")
    elif args.command == "score":
        from dermpipe.segmentation.metrics import image_scores, mean_scores, read_mask

        rows = Manifest.read(args.manifest).select(args.split).rows

        def scores(folder: str) -> list[dict[str, float]]:
            return [image_scores(read_mask(Path(folder) / f"{r['image_id']}_segmentation.png"),
                                 read_mask(Path(r["mask_path"]))) for r in rows]  # fmt: skip

        per_image = scores(args.pred)
        means = mean_scores(per_image)
        print(f"{args.split} ({len(rows)} images): " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
        if args.against:
            out = means | paired_differences(per_image, scores(args.against))
            for metric in ("jaccard", "thresholded_jaccard"):
                d = out[f"{metric}_difference"]
                print(f"{metric} minus {args.against}'s: {d[0]:+.4f} (95% interval {d[1]:+.4f} to {d[2]:+.4f})")
            means = out
        if args.json:
            Path(args.json).write_text(json.dumps({"split": args.split, "images": len(rows), **means}, indent=1))
    else:
        path = real_sample_manifest(Path(args.root), Path(args.out), args.train_images, args.val_images, args.seed)
        manifest = Manifest.read(path)
        counts = {s: len(manifest.select(s)) for s in ("train", "val", "test")}
        print(f"wrote {path}: {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
