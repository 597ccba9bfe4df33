"""Lesion masks, boxes and square crops: ``python segmentation/predict.py --manifest M`` (or ``--input DIR``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dermpipe.configs.loader import default_config_path
from dermpipe.configs.schema import ROOT_LAYOUT
from dermpipe.data.listing import read_inputs
from dermpipe.engine.cli import add_follow_links, resolve_config, run_cli, stage_parser
from dermpipe.engine.run import check_run_folder
from dermpipe.segmentation.config import SegmentationConfig
from dermpipe.segmentation.stage import crop


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
        inputs = read_inputs(args.manifest, args.input, args.follow_links, outputs=[args.out])
        manifest, excluded = inputs.manifest, inputs.excluded
        if args.split:
            manifest = manifest.select(args.split)
        checkpoint = Path(args.checkpoint) if args.checkpoint else run_dir / "best.safetensors"
        crops = crop(cfg, manifest, args.out, checkpoint, excluded=excluded, source=args.input or args.manifest,
                     manifest_file=args.manifest, strict=strict)  # fmt: skip
        print(crops.line())
        return 0

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
