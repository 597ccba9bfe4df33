"""Predict a folder of photos end to end: ``python ensemble/predict.py --input DIR --output predictions.csv``."""

from __future__ import annotations

import argparse
from pathlib import Path

from dermpipe.data.manifest import read_inputs
from dermpipe.engine.cli import MissingInputError, resolve_config, run_cli, stage_parser
from dermpipe.engine.files import check_output_file, check_output_folder
from dermpipe.engine.run import check_run_folder, choose_device, setup_logging
from dermpipe.ensemble.bundle import BundleError, open_bundle
from dermpipe.ensemble.config import PredictConfig
from dermpipe.ensemble.prediction import EnsemblePredictor, predict_folder


def check_trained_stages(cfg: PredictConfig) -> None:
    """Each trained stage prediction needs is there, or one line naming the command that makes it and the flag."""
    root = cfg.run.root
    needed = [
        (Path(cfg.segmentation_run) / "best.safetensors", "the U-Net",
         f"python segmentation/train.py --manifest FILE --root {root}", "--segmentation-run"),
        (Path(cfg.ensemble_run) / "meta.safetensors", "the vote",
         f"python ensemble/vote.py --root {root}", "--ensemble-run"),
    ]  # fmt: skip
    for path, what, command, flag in needed:
        if not path.is_file():
            raise MissingInputError(
                f"{what} is not trained: {path} not found; make it with `{command}`, or pass {flag} FOLDER "
                "(or --root, or --model BUNDLE)"
            )


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("predict", __doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="folder of images (recursive: jpg, jpeg, png, bmp, tif)")
    source.add_argument("--manifest", help="or a manifest CSV of images")
    parser.add_argument("--output", default=None, help="predictions CSV (default: OUT/predictions.csv)")
    parser.add_argument("--out", default=None, help="folder for skipped.csv, report.html and optional outputs")
    parser.add_argument(
        "--model", default=None, help="a model bundle folder (dermpipe bundle): every trained stage from it alone"
    )
    parser.add_argument("--segmentation-run", default=None, help="trained U-Net's run (default: ROOT/segmentation)")
    parser.add_argument(
        "--classification-root", default=None, help="folder of one run per backbone (default: ROOT/classification)"
    )
    parser.add_argument("--ensemble-run", default=None, help="trained vote's run folder (default: ROOT/ensemble)")
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
        bundle = None
        if args.model:
            given = [f for f in ("segmentation_run", "classification_root", "ensemble_run") if getattr(args, f)]
            if given:
                flag = "--" + given[0].replace("_", "-")
                raise BundleError(f"--model {args.model} holds every trained stage: drop {flag}")
            bundle = open_bundle(args.model)  # verified against its sha256 manifest before anything is read
            flags.update(bundle.stage_paths())
        cfg = resolve_config(PredictConfig, args, flags)
        out = check_output_folder(cfg.run.out_dir, "--out", [args.input] if args.input else [])
        output = check_output_file(args.output if args.output else out / "predictions.csv", "--output")
        if args.input and Path(args.input).resolve() in output.resolve().parents:
            check_output_folder(output.parent, "--output", [args.input])
        check_run_folder(Path(cfg.segmentation_run), "segmentation")
        check_run_folder(Path(cfg.ensemble_run), "ensemble")
        check_trained_stages(cfg)
        inputs = read_inputs(args.manifest, args.input)
        manifest, excluded = inputs.manifest, inputs.excluded
        predictor = EnsemblePredictor(cfg, choose_device(cfg.run.device))
        setup_logging(out)  # everything validated: from here on the output folder is written
        model_id = bundle.identity if bundle is not None else str(Path(cfg.ensemble_run))
        s = predict_folder(manifest, predictor, output, out, excluded, model_id=model_id)
        scored = f"; balanced accuracy {s['balanced accuracy']:.3f} on {s['scored']} labelled" if s["scored"] else ""
        if s["masks scored"]:
            scored += f"; mask Jaccard {s['mask jaccard']:.3f} on {s['masks scored']} true masks"
        print(
            f"predict: {s['images']} images ({s['referred']} to refer, {s['whole-image fallbacks']} whole-image "
            f"fallbacks), {s['skipped']} skipped{scored}; {s['cache']}; wrote {output}"
        )
        return 0

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
