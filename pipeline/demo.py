"""The whole pipeline end to end on synthetic data, on the CPU, in a few minutes: ``make demo``.

Calls each stage as a library call (what the stage scripts call), in one process, at demo size, with tiny timm
backbones trained from scratch, so it needs neither the network nor a GPU.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from dermpipe.bundle.write import write_bundle
from dermpipe.classification import stage as classification
from dermpipe.classification.config import ClassificationConfig
from dermpipe.configs.loader import default_config_path, load_config
from dermpipe.data.generator import generate_dataset, make_sample
from dermpipe.data.reading import write_image
from dermpipe.engine.cli import run_cli
from dermpipe.engine.run import setup_logging
from dermpipe.ensemble import stage as ensemble
from dermpipe.ensemble.config import EnsembleConfig
from dermpipe.pipeline.run import crop_trained
from dermpipe.predict.api import Model
from dermpipe.predict.config import PredictConfig
from dermpipe.segmentation import stage as segmentation
from dermpipe.segmentation.config import SegmentationConfig

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Five tiny timm models stand in for resnet50, densenet169, inception_v3, inception_resnet_v2 and xception.
DEMO_BACKBONES = ("test_resnet", "test_efficientnet", "test_convnext", "test_byobnet", "test_nfnet")


def _step(name: str, call: Callable[[], Any]) -> Any:
    start = time.time()
    result = call()
    print(f"demo: {name} done in {time.time() - start:.0f}s", flush=True)
    return result


def _config(cls: type[T], stage: str, sets: Sequence[str], flags: dict[str, Any]) -> T:
    return load_config(cls, default_config_path(stage), sets, flags)


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
    return run_cli(lambda: _demo(args))


def _demo(args: argparse.Namespace) -> int:
    """Each stage's library call in turn, in this one process, with the demo's small settings."""
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    root = {"run.root": str(out), "run.device": "cpu"}  # every stage reads and writes under the demo folder
    t0 = time.time()

    data = out / "data"
    manifest = _step(f"synthetic data ({args.images} images)",
                     lambda: generate_dataset(data, n_images=args.images, size=96, seed=0))  # fmt: skip
    write_photo_folder(out / "photos", 24, 96, seed=123)
    seg = _config(SegmentationConfig, "segmentation", [
        "model.encoder=tu-test_resnet", "model.encoder_weights=null", "model.decoder_channels=[64,32,16,16,8]",
        "data.image_size=64", "train.batch_size=16", "train.lr=0.005",
    ], {**root, "data.manifest": str(manifest), "train.epochs": args.seg_epochs})  # fmt: skip
    print(_step("segmentation/train.py", lambda: segmentation.train(seg)).line())
    crops = _step("segmentation/predict.py", lambda: crop_trained(out, str(manifest), ["predict.crop_size=64"], root))
    print(crops.line())
    backbones = args.backbones.split(",")
    for backbone in backbones:
        cfg = _config(ClassificationConfig, "classification", [
            "model.pretrained=false", "data.image_size=48", "train.batch_size=32", "train.lr=0.003",
            "train.gradcam_images=2",
            "run.threads=1",  # tiny models run faster on one thread than on two contending ones
        ], {**root, "model.backbone": backbone, "train.epochs": args.cls_epochs})  # fmt: skip
        print(_step(f"classification/train.py --backbone {backbone}", lambda cfg=cfg: classification.train(cfg)).line())
    ens = _config(EnsembleConfig, "ensemble", [], {**root, "data.backbones": args.backbones})
    print(_step("ensemble/vote.py", lambda: ensemble.vote(ens)).line())

    predict = _config(PredictConfig, "predict", [], {**root, "run.out_dir": str(out), "outputs.gradcam": True})
    model = Model.from_config(predict)
    setup_logging(out)  # as `dermpipe predict --out` does: its log beside the predictions
    summary = _step("ensemble/predict.py",
                    lambda: model.predict_folder(out / "photos", out, output=out / "predictions.csv"))  # fmt: skip
    print(f"predict: {summary.line()}; wrote {out / 'predictions.csv'}")

    bundle = out / "bundle"
    if bundle.exists():  # a bundle is never overwritten: --fresh makes a new one
        print(f"demo: {bundle} exists (reused; --fresh trains and bundles again)")
    else:
        made = _step("dermpipe bundle", lambda: write_bundle(out, bundle))
        print(f"bundle: {made.identity}; wrote {made.path}")
    print(f"demo: finished in {time.time() - t0:.0f}s; see {out / 'predictions.csv'} and {out / 'report.html'}; "
          f"serve it with `dermpipe serve --model {bundle}`")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
