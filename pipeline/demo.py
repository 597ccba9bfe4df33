"""The whole pipeline end to end on synthetic data, on the CPU, in a few minutes: ``make demo``.

Runs the same commands a user runs (each stage's ``main``), at demo size, with tiny timm backbones trained from
scratch, so it needs neither the network nor a GPU.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from dermpipe.bundle import make_bundle
from dermpipe.classification import train as classification_train
from dermpipe.data.generator import generate_dataset, make_sample
from dermpipe.data.reading import write_image
from dermpipe.ensemble import vote as ensemble_vote
from dermpipe.predict import cli as ensemble_predict
from dermpipe.segmentation import predict as segmentation_predict
from dermpipe.segmentation import train as segmentation_train

logger = logging.getLogger(__name__)

# Five tiny timm models stand in for resnet50, densenet169, inception_v3, inception_resnet_v2 and xception.
DEMO_BACKBONES = ("test_resnet", "test_efficientnet", "test_convnext", "test_byobnet", "test_nfnet")


def _step(name: str, code: int, start: float) -> None:
    if code != 0:
        raise SystemExit(f"demo: {name} failed (exit {code})")
    print(f"demo: {name} done in {time.time() - start:.0f}s", flush=True)


def write_photo_folder(folder: Path, n: int, size: int, seed: int) -> None:
    """New synthetic photos to predict, plus a file that is not an image (skipped and reported)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = ("nv", "mel", "bkl", "bcc")
    for i in range(n):
        image, _ = make_sample(rng, classes[i % len(classes)], size)
        write_image(folder / f"photo_{i:03d}.jpg", image)
    (folder / "notes.jpg").write_text("this is not a photo")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/demo", help="demo folder (default runs/demo)")
    parser.add_argument("--images", type=int, default=240, help="synthetic training images")
    parser.add_argument("--seg-epochs", type=int, default=6)
    parser.add_argument("--cls-epochs", type=int, default=20)
    parser.add_argument("--backbones", default=",".join(DEMO_BACKBONES))
    parser.add_argument("--fresh", action="store_true", help="delete the demo folder first (else reruns reuse it)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    root = ["--root", str(out), "--device", "cpu"]  # every stage reads and writes under the demo folder
    t0 = time.time()

    start = time.time()
    manifest = generate_dataset(out / "data", n_images=args.images, size=96, seed=0)
    write_photo_folder(out / "photos", 24, 96, seed=123)
    _step(f"synthetic data ({args.images} images) -> {manifest}", 0, start)

    start = time.time()
    code = segmentation_train.main([
        "--manifest", str(manifest), "--epochs", str(args.seg_epochs), *root,
        "--set", "model.encoder=tu-test_resnet", "--set", "model.encoder_weights=null",
        "--set", "model.decoder_channels=[64,32,16,16,8]", "--set", "data.image_size=64",
        "--set", "train.batch_size=16", "--set", "train.lr=0.005",
    ])  # fmt: skip
    _step("segmentation/train.py", code, start)

    start = time.time()
    code = segmentation_predict.main([
        "--manifest", str(manifest), *root, "--set", "predict.crop_size=64",
    ])  # fmt: skip
    _step("segmentation/predict.py", code, start)

    for backbone in args.backbones.split(","):
        start = time.time()
        code = classification_train.main([
            "--backbone", backbone, "--epochs", str(args.cls_epochs), *root,
            "--set", "model.pretrained=false", "--set", "data.image_size=48",
            "--set", "train.batch_size=32", "--set", "train.lr=0.003", "--set", "train.gradcam_images=2",
            "--set", "run.threads=1",  # tiny models run faster on one thread than on two contending ones
        ])  # fmt: skip
        _step(f"classification/train.py --backbone {backbone}", code, start)

    start = time.time()
    code = ensemble_vote.main([
        "--backbones", args.backbones, *root,
    ])  # fmt: skip
    _step("ensemble/vote.py", code, start)

    start = time.time()
    code = ensemble_predict.main([
        "--input", str(out / "photos"), "--output", str(out / "predictions.csv"), "--out", str(out), *root,
        "--gradcam",
    ])  # fmt: skip
    _step("ensemble/predict.py", code, start)

    start = time.time()
    bundle = out / "bundle"
    if bundle.exists():  # a bundle is never overwritten: --fresh makes a new one
        print(f"demo: {bundle} exists (reused; --fresh trains and bundles again)")
    else:
        _step("dermpipe bundle", make_bundle.main(["--root", str(out), "--out", str(bundle)]), start)
    print(f"demo: finished in {time.time() - t0:.0f}s; see {out / 'predictions.csv'} and {out / 'report.html'}; "
          f"serve it with `dermpipe serve --model {bundle}`")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
