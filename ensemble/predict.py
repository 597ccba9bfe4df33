"""Predict a folder of photos end to end: ``python ensemble/predict.py --input DIR --output predictions.csv``."""

from __future__ import annotations

import argparse
from pathlib import Path

from dermpipe.data.manifest import Manifest, manifest_from_folder
from dermpipe.engine.cli import resolve_config, run_cli, stage_parser
from dermpipe.engine.run import choose_device, setup_logging
from dermpipe.ensemble.config import PredictConfig
from dermpipe.ensemble.prediction import EnsemblePredictor, predict_folder


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("predict", __doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="folder of images (recursive: jpg, jpeg, png, bmp, tif)")
    source.add_argument("--manifest", help="or a manifest CSV of images")
    parser.add_argument("--output", default=None, help="predictions CSV (default: OUT/predictions.csv)")
    parser.add_argument("--out", default=None, help="folder for skipped.csv, report.html and optional outputs")
    parser.add_argument("--segmentation-run", default=None, help="trained segmentation run folder")
    parser.add_argument("--classification-root", default=None, help="folder holding one run per backbone")
    parser.add_argument("--ensemble-run", default=None, help="trained ensemble run folder (meta.safetensors)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None, help="classifier TTA")
    parser.add_argument("--report", action=argparse.BooleanOptionalAction, default=None, help="write report.html")
    parser.add_argument("--gradcam", action="store_true", default=None, help="Grad-CAM overlays in the report")
    parser.add_argument("--masks", action="store_true", default=None, help="write ISIC-style masks")
    parser.add_argument("--crops", action="store_true", default=None, help="write the lesion crops")
    parser.add_argument("--isic-csv", action="store_true", default=None, help="write an ISIC submission CSV")
    args = parser.parse_args(argv)

    def body() -> int:
        flags = {
            "run.out_dir": args.out,
            "segmentation_run": args.segmentation_run,
            "classification_root": args.classification_root,
            "ensemble_run": args.ensemble_run,
            "tta": args.tta,
            "outputs.report": args.report,
            "outputs.gradcam": args.gradcam,
            "outputs.masks": args.masks,
            "outputs.crops": args.crops,
            "outputs.isic_csv": args.isic_csv,
        }
        cfg = resolve_config(PredictConfig, args, flags)
        out = Path(cfg.run.out_dir)
        output = Path(args.output) if args.output else out / "predictions.csv"
        manifest = Manifest.read(args.manifest) if args.manifest else manifest_from_folder(args.input)
        setup_logging(out)
        predictor = EnsemblePredictor(cfg, choose_device(cfg.run.device))
        s = predict_folder(manifest, predictor, output, out)
        print(
            f"predict: {s['images']} images ({s['referred']} to refer, {s['whole-image fallbacks']} whole-image "
            f"fallbacks), {s['skipped']} skipped; {s['cache']}; wrote {output}"
        )
        return 0

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
