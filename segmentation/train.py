"""Train the lesion U-Net: ``python segmentation/train.py --manifest runs/ham.csv [--set train.epochs=20]``."""

from __future__ import annotations

from dermpipe.engine.cli import resolve_config, run_cli, stage_parser
from dermpipe.segmentation.config import SegmentationConfig
from dermpipe.segmentation.stage import train


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("segmentation", __doc__)
    parser.add_argument("--manifest", help="manifest CSV with image_path, mask_path and split columns")
    parser.add_argument("--out", help="run folder (default: run.out_dir)")
    parser.add_argument("--epochs", type=int, help="number of epochs (train.epochs)")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's last_state.pt")
    args = parser.parse_args(argv)

    def body() -> int:
        flags = {"data.manifest": args.manifest, "run.out_dir": args.out, "train.epochs": args.epochs}
        result = train(resolve_config(SegmentationConfig, args, flags), resume=args.resume)
        if result is not None:  # None: another rank than 0 under torchrun, where rank 0 reports
            print(result.line())
        return 0

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
