"""Lesion masks, boxes and square crops: ``python segmentation/predict.py --manifest M`` (or ``--input DIR``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dermpipe.configs.loader import default_config_path
from dermpipe.configs.schema import ROOT_LAYOUT
from dermpipe.data.manifest import NothingReadableError, read_inputs
from dermpipe.engine.cli import MissingInputError, add_follow_links, resolve_config, run_cli, stage_parser
from dermpipe.engine.confine import confine_output
from dermpipe.engine.files import check_output_folder
from dermpipe.engine.lineage import file_sha256, write_lineage
from dermpipe.engine.run import check_run_folder, choose_device, setup_logging
from dermpipe.segmentation.config import SegmentationConfig
from dermpipe.segmentation.prediction import SegmentationPredictor, write_crops


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("segmentation", __doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="manifest CSV of the images to crop")
    source.add_argument("--input", help="a folder of images (recursive)")
    add_follow_links(parser)
    parser.add_argument("--split", help="with --manifest: only the rows of this split (train, val or test)")
    parser.add_argument("--run", help="trained segmentation run folder (default: ROOT/segmentation)")
    parser.add_argument("--checkpoint", help="U-Net checkpoint (default: RUN/best.safetensors)")
    parser.add_argument("--out", help="where crops.csv, boxes.csv and crops/ go (default: ROOT/crops)")
    parser.add_argument(
        "--masks",
        action="store_true",
        default=None,
        help="also write ISIC_xxx_segmentation.png masks (0/255, image size)",
    )
    parser.add_argument(
        "--tta", action=argparse.BooleanOptionalAction, default=None, help="flip test-time augmentation (predict.tta)"
    )
    args = parser.parse_args(argv)

    def body() -> int:
        root = Path(resolve_config(SegmentationConfig, args, {}).run.root)
        run_dir = Path(args.run) if args.run else root / ROOT_LAYOUT["segmentation"]
        args.out = args.out or str(root / ROOT_LAYOUT["crops"])
        check_run_folder(run_dir, "segmentation")
        # a config of the run's own, or the user's, must agree with what the checkpoint was trained with
        strict = args.config != str(default_config_path("segmentation")) or any(
            o.strip().startswith("data.") for o in args.overrides
        )
        if args.config == str(default_config_path("segmentation")) and (run_dir / "config.yaml").is_file():
            args.config = run_dir / "config.yaml"  # the trained run's own settings, unless --config or --set
            strict = True
        cfg = resolve_config(SegmentationConfig, args, {"predict.write_masks": args.masks, "predict.tta": args.tta})
        check_output_folder(args.out, "--out", [args.input] if args.input else [])
        confine_output(args.out, "--out", own="crops")  # a crops folder is its own rerun; a bundle or run never
        inputs = read_inputs(args.manifest, args.input, args.follow_links, outputs=[args.out])
        manifest, excluded = inputs.manifest, inputs.excluded
        if args.split:
            manifest = manifest.select(args.split)
        checkpoint = Path(args.checkpoint) if args.checkpoint else run_dir / "best.safetensors"
        if not checkpoint.is_file():
            raise MissingInputError(
                f"no trained U-Net at {checkpoint}: train one with `python segmentation/train.py --manifest FILE "
                f"--root {root}`, or pass --run FOLDER (a segmentation run) or --checkpoint FILE"
            )
        device = choose_device(cfg.run.device)
        predictor = SegmentationPredictor(
            checkpoint, cfg, device, force=cfg.run.force, strict=strict, workers=cfg.run.num_workers
        )
        setup_logging(Path(args.out))  # everything validated: from here on the output folder is written
        s = write_crops(manifest, predictor, args.out, cfg.predict.write_masks, cfg.predict.write_crops, excluded)
        if not s["cropped"]:
            raise NothingReadableError(args.input or args.manifest, s["skipped"], args.out)
        consumed = {"unet": file_sha256(checkpoint)}
        if args.manifest:
            consumed["manifest"] = file_sha256(args.manifest)
        write_lineage(Path(args.out), "crops", consumed, {"crops_manifest": file_sha256(Path(args.out) / "crops.csv")})
        corrupt = f", {s['corrupt']} corrupt recomputed" if s["corrupt"] else ""
        print(
            f"segmentation/predict: {s['cropped']} cropped ({s['fallback']} whole-image fallbacks), "
            f"{s['skipped']} skipped; cache: {s['reused']} reused, {s['computed']} computed{corrupt}; wrote {args.out}"
        )
        return 0

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
