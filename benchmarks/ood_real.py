"""The out-of-distribution check on the real sample (BENCHMARKS.md): how many real test photos it refers as "unlike
the training images", and how much of a junk set (noise, blank, gradient, skin-like noise, cartoons, photos that are
not dermoscopy, text) is referred or skipped.

python benchmarks/ood_real.py build --data ../shared/data/isic_real      # the small real-data pipeline (cached)
python benchmarks/ood_real.py measure                                    # junk set, predictions, shares -> JSON

``build`` writes ``runs/bench/ood/isic_ood.csv`` (a random subset of each split of the real sample, seed 0:
``--train-images``, ``--val-images``, ``--test-images``) and runs the stage commands into ``runs/bench/ood/root`` at CPU
sizes: a ResNet-18 U-Net from scratch at 96 px (``--seg-epochs``; an existing ``root/segmentation/best.safetensors`` is
used as it is), crops at 64 px without TTA, two small classifiers from scratch (``--epochs``), each fitting its
out-of-distribution check after training, and the vote. Each stage reuses what it finished before. ``measure`` writes
the junk set into ``runs/bench/ood/junk`` (drawn here, seeded; the photos are scikit-image's bundled ones: nothing is
downloaded), predicts the manifest's test rows and the junk set through the run root, and writes
``runs/bench/ood/ood.json``: per set and per junk kind the share referred as unlike the training images, for no lesion,
for any reason, and referred or skipped; and the time the check adds to the classifiers' forward passes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OUT = Path("runs/bench/ood")
BACKBONES = ("resnet18", "mobilenetv3_small_100")


SEGMENTATION = ["--set", "model.encoder=resnet18", "--set", "model.encoder_weights=null", "--set",
                "data.image_size=96", "--set", "train.batch_size=32", "--set", "train.panel_images=0", "--set",
                "run.threads=2"]  # fmt: skip
CLASSIFICATION = ["--set", "model.pretrained=false", "--set", "model.drop_rate=0.0", "--set", "train.freeze_epochs=0",
                  "--set", "train.batch_size=64", "--set", "train.lr=0.002", "--set", "train.schedule=onecycle",
                  "--set", "train.gradcam_images=0", "--set", "run.threads=2"]  # fmt: skip


def _step(name: str, main: Callable[[list[str]], int], argv: list[str], times: dict[str, float]) -> None:
    start = time.time()
    print(f"{name.split()[0]} {' '.join(argv)}", flush=True)
    code = main(argv)
    if code:
        raise SystemExit(f"{name} failed with exit status {code}")
    times[name] = round(time.time() - start, 1)


def build(args: argparse.Namespace) -> int:
    """The small real-data pipeline, stage by stage (each stage reuses what it finished before)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from segmentation_quality import real_sample_manifest

    from dermpipe.classification import train as classification_train
    from dermpipe.ensemble import vote
    from dermpipe.segmentation import predict as segmentation_predict
    from dermpipe.segmentation import train as segmentation_train

    out = Path(args.out)
    root = out / "root"
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "isic_ood.csv"
    if not manifest.is_file():
        real_sample_manifest(Path(args.data), manifest, args.train_images, args.val_images, seed=0)
        if args.test_images:  # a random subset of the test split too (the converter keeps it whole)
            _subset_test(manifest, args.test_images)
    times: dict[str, float] = {}
    common = ["--root", str(root), "--device", "cpu"]
    if (root / "segmentation" / "best.safetensors").is_file():
        print(f"reusing the U-Net in {root / 'segmentation'}", flush=True)
    else:
        seg = ["--manifest", str(manifest), *common, "--epochs", str(args.seg_epochs), *SEGMENTATION]
        _step("segmentation/train.py", segmentation_train.main, seg, times)
    crops = ["--manifest", str(manifest), *common, "--set", f"predict.crop_size={args.image_size}",
             "--set", "predict.tta=false", "--set", "run.threads=2"]  # fmt: skip
    _step("segmentation/predict.py", segmentation_predict.main, crops, times)
    for backbone in BACKBONES:
        cls = ["--backbone", backbone, *common, "--epochs", str(args.epochs), *CLASSIFICATION,
               "--set", f"data.image_size={args.image_size}"]  # fmt: skip
        _step(f"classification/train.py --backbone {backbone}", classification_train.main, cls, times)
    _step("ensemble/vote.py", vote.main, [*common, "--set", "evaluation.bootstrap=200"], times)
    (out / "build_times.json").write_text(json.dumps(times, indent=1) + "\n")
    print(json.dumps(times, indent=1))
    return 0


def _subset_test(manifest: Path, n: int, seed: int = 0) -> None:
    from dermpipe.data.manifest import Manifest

    m = Manifest.read(manifest)
    test = [i for i, r in enumerate(m.rows) if r.get("split") == "test"]
    rng = np.random.default_rng(seed)
    drop = set(test) - set(rng.choice(test, min(n, len(test)), replace=False).tolist())
    Manifest(rows=tuple(r for i, r in enumerate(m.rows) if i not in drop), classes=m.classes, info=m.info).write(
        manifest
    )


PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "coins",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "retina",
    "brick",
    "grass",
    "gravel",
)  # scikit-image's bundled pictures: no download
WORDS = ("dermoscopy report", "INVOICE 2026-12", "lorem ipsum dolor", "Patient: 0042", "hello world", "12345 67890")


def _cartoon(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Flat colours and outlines drawn with OpenCV: a sky, a sun, a house, a face or a blob, as a child draws."""
    import cv2

    image = np.zeros((height, width, 3), np.uint8)
    image[:] = rng.integers(60, 256, 3)
    for _ in range(int(rng.integers(3, 8))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(0, 3))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        if kind == 0:
            cv2.circle(image, (x, y), int(rng.integers(15, height // 3)), colour, -1)
        elif kind == 1:
            corner = (x + int(rng.integers(20, width // 2)), y + int(rng.integers(20, height // 2)))
            cv2.rectangle(image, (x, y), corner, colour, -1)
        else:
            points = rng.integers(0, [width, height], (int(rng.integers(3, 7)), 2)).astype(np.int32)
            cv2.fillPoly(image, [points], colour)
        cv2.polylines(image, [rng.integers(0, [width, height], (4, 2)).astype(np.int32)], True, (0, 0, 0), 3)
    return image


def write_junk(folder: Path, per_kind: int = 8, seed: int = 0) -> dict[str, list[Path]]:
    """The junk set, by kind (PNG, lossless; the photos as JPEG as a camera writes them)."""
    import cv2
    import skimage.data

    from dermpipe.data.reading import write_image

    rng = np.random.default_rng(seed)
    h, w = 450, 600  # the real sample's usual size
    kinds: dict[str, list[np.ndarray]] = {k: [] for k in ("noise", "blank", "gradient", "skin noise", "cartoon",
                                                         "photo", "text")}  # fmt: skip
    for _ in range(per_kind):
        kinds["noise"].append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        skin = np.array([205, 150, 125]) + rng.normal(0, 8, 3)
        kinds["skin noise"].append(np.clip(skin + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))
        kinds["cartoon"].append(_cartoon(rng, h, w))
    for level in (0, 40, 128, 200, 255):
        kinds["blank"].append(np.full((h, w, 3), level, np.uint8))
    kinds["blank"].append(np.full((h, w, 3), (205, 150, 125), np.uint8))  # flat skin colour
    ramp = np.linspace(0, 255, w)[None, :, None]
    for image in (ramp, ramp[:, ::-1], np.linspace(0, 255, h)[:, None, None], np.linspace(60, 190, w)[None, :, None]):
        kinds["gradient"].append(np.broadcast_to(image, (h, w, 3)).astype(np.uint8).copy())
    for name in PHOTOS:
        picture = getattr(skimage.data, name)()
        kinds["photo"].append(np.repeat(picture[:, :, None], 3, 2) if picture.ndim == 2 else picture[:, :, :3])
    for words in WORDS:
        page = np.full((h, w, 3), 255, np.uint8)
        for line in range(4):
            cv2.putText(page, words, (20, 100 + 90 * line), cv2.FONT_HERSHEY_SIMPLEX, 1.5, (0, 0, 0), 3)
        kinds["text"].append(page)
    for name in ("page", "text"):
        kinds["text"].append(np.repeat(getattr(skimage.data, name)()[:, :, None], 3, 2))
    paths: dict[str, list[Path]] = {}
    for kind, images in kinds.items():
        for i, image in enumerate(images):
            suffix = ".jpg" if kind == "photo" else ".png"
            path = folder / kind.replace(" ", "_") / f"{i:02d}{suffix}"
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                write_image(path, np.ascontiguousarray(image))
            paths.setdefault(kind, []).append(path)
    return paths


def _category(reason: str) -> str:
    """The first of: unlike the training images, no lesion found, input quality, low confidence; '' when kept."""
    from dermpipe.classification.ood import OOD_REASON

    for key, text in (("unlike", OOD_REASON), ("no lesion", "no lesion found"), ("quality", "input quality"),
                      ("confidence", "below the refer threshold")):  # fmt: skip
        if text in reason:
            return key
    return ""


def _shares(reasons: list[str], skipped: int = 0) -> dict[str, Any]:
    n = len(reasons) + skipped
    unlike = sum("unlike the training images" in r for r in reasons)
    no_lesion = sum("no lesion found" in r for r in reasons)
    referred = sum(bool(r) for r in reasons)
    return {
        "images": n,
        "skipped": skipped,
        "referred_unlike_training": round(unlike / n, 4) if n else None,
        "referred_no_lesion": round(no_lesion / n, 4) if n else None,
        "referred_any_reason": round(referred / n, 4) if n else None,
        "referred_or_skipped": round((referred + skipped) / n, 4) if n else None,
        "referred_unlike_or_no_lesion_or_quality_or_skipped": round(
            (sum(_category(r) in ("unlike", "no lesion", "quality") for r in reasons) + skipped) / n, 4
        )
        if n
        else None,
    }


def check_cost(root: Path, crops: list[np.ndarray], rounds: int = 3) -> dict[str, Any]:
    """Seconds of each backbone's forward passes over ``crops`` without and with the features kept and scored (the
    best of ``rounds`` alternating runs, no cache): what the check adds to batch prediction's classifier work."""
    from dermpipe.classification.backbones import load_classifier
    from dermpipe.classification.ood import OOD_FILE, load_ood
    from dermpipe.classification.prediction import predict_probabilities, predict_with_features

    cost: dict[str, Any] = {}
    for folder in sorted((root / "classification").iterdir()):
        if not (folder / OOD_FILE).is_file():
            continue
        model, _ = load_classifier(folder / "best.safetensors")
        stats = load_ood(folder / OOD_FILE)
        plain, checked = [], []
        for _ in range(rounds):
            start = time.perf_counter()
            predict_probabilities(model, crops, batch_size=64)
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            _, features = predict_with_features(model, crops, batch_size=64)
            stats.ratio(features)
            checked.append(time.perf_counter() - start)
        cost[folder.name] = {"images": len(crops), "without_s": round(min(plain), 3), "with_s": round(min(checked), 3),
                             "added": round(min(checked) / min(plain) - 1, 4)}  # fmt: skip
    return cost


def measure(args: argparse.Namespace) -> int:
    import torch

    from dermpipe.configs.schema import RunConfig
    from dermpipe.data.manifest import Manifest
    from dermpipe.data.reading import read_image
    from dermpipe.predict.config import PredictConfig
    from dermpipe.predict.predictor import EnsemblePredictor
    from dermpipe.predict.rows import refer_reason
    from dermpipe.segmentation.prediction import SkipLog

    out = Path(args.out)
    root = out / "root"
    torch.set_num_threads(args.threads)
    junk = write_junk(out / "junk")
    test = [(r["image_id"], r["image_path"]) for r in Manifest.read(out / "isic_ood.csv").select("test").rows]
    junk_items = [(f"junk/{kind}/{p.stem}", str(p)) for kind, paths in junk.items() for p in paths]
    cfg = PredictConfig(
        segmentation_run=str(root / "segmentation"),
        classification_root=str(root / "classification"),
        ensemble_run=str(root / "ensemble"),
        run=RunConfig(cache_dir=str(root / "cache"), threads=args.threads),
    )
    predictor = EnsemblePredictor(cfg, torch.device("cpu"))
    start = time.time()
    skipped = SkipLog()
    reasons: dict[str, str] = {}
    for crop, probs in predictor.predict([*test, *junk_items], skipped):
        reasons[crop.image_id] = refer_reason(crop, probs, predictor.refer_threshold)
    seconds = time.time() - start
    skipped_ids = {row["image_id"] for row in skipped.rows}
    # each backbone's distance over its threshold (from the cache the prediction filled), for the rules compared
    ratios: dict[str, list[float]] = {}
    passed = list(skipped.passed(predictor.segmenter.crop([i for i in [*test, *junk_items] if i[0] in reasons])))
    scored = [c.scored(passed)[1] for c in predictor.classifiers]
    for n, crop in enumerate(passed):
        ratios[crop.image_id] = [float(r[n]) for r in scored if r is not None]
    result: dict[str, Any] = {
        "command": "python benchmarks/ood_real.py measure",
        "ood_check": predictor.ood_check,
        "refer_threshold": predictor.refer_threshold,
        "temperature": predictor.temperature,
        "real_test": _shares([reasons[i] for i, _ in test if i in reasons], sum(i in skipped_ids for i, _ in test)),
        "junk": _shares(
            [reasons[i] for i, _ in junk_items if i in reasons], sum(i in skipped_ids for i, _ in junk_items)
        ),
        "junk_by_kind": {
            kind: _shares(
                [reasons[f"junk/{kind}/{p.stem}"] for p in paths if f"junk/{kind}/{p.stem}" in reasons],
                sum(f"junk/{kind}/{p.stem}" in skipped_ids for p in paths),
            )
            for kind, paths in junk.items()
        },
        "rules": {
            rule: {
                name: round(float(np.mean([decide(np.array(ratios[i])) for i, _ in items if i in ratios])), 4)
                for name, items in (("real_test", test), ("junk", junk_items))
            }
            for rule, decide in (
                ("mean ratio above 1 (used)", lambda r: r.mean() > 1),
                ("any backbone above its threshold", lambda r: (r > 1).any()),
                ("every backbone above its threshold", lambda r: (r > 1).all()),
            )
        },  # fmt: skip
        "junk_reasons": {i: reasons.get(i, "skipped") for i, _ in junk_items},
        "junk_ratios": {i: ratios.get(i) for i, _ in junk_items},
        "predict_seconds": round(seconds, 1),
    }
    crops = [read_image(p) for p in sorted((root / "crops" / "crops").glob("*.png"))[: args.cost_images]]
    result["check_cost"] = check_cost(root, crops)
    (out / "ood.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("junk_reasons", "junk_ratios")}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(OUT), help="the benchmark's folder (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="the small real-data pipeline")
    b.add_argument("--data", required=True, help="the real sample (images/, masks/, labels.csv)")
    b.add_argument("--train-images", type=int, default=600)
    b.add_argument("--val-images", type=int, default=200)
    b.add_argument("--test-images", type=int, default=300, help="a random subset of the test split (0: all of it)")
    b.add_argument("--image-size", type=int, default=64)
    b.add_argument("--epochs", type=int, default=3)
    b.add_argument("--seg-epochs", type=int, default=1)
    m = sub.add_parser("measure", help="the junk set and both shares (runs/bench/ood/ood.json)")
    m.add_argument("--threads", type=int, default=2)
    m.add_argument("--cost-images", type=int, default=256, help="crops timed with and without the check")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return build(args) if args.command == "build" else measure(args)


if __name__ == "__main__":
    raise SystemExit(main())
