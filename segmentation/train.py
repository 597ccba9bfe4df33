"""Train the lesion U-Net: ``python segmentation/train.py --manifest runs/ham.csv [--set train.epochs=20]``."""

from __future__ import annotations

from dermpipe.data.manifest import Manifest, ManifestError
from dermpipe.engine.cli import resolve_config, run_cli, stage_parser
from dermpipe.engine.run import start_stage_run
from dermpipe.segmentation.config import SegmentationConfig
from dermpipe.segmentation.training import train_segmentation


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("segmentation", __doc__)
    parser.add_argument("--manifest", help="manifest CSV with image_path, mask_path and split columns")
    parser.add_argument("--out", help="run folder (default: run.out_dir)")
    parser.add_argument("--epochs", type=int, help="number of epochs (train.epochs)")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's last_state.pt")
    args = parser.parse_args(argv)

    def body() -> int:
        cfg = resolve_config(
            SegmentationConfig,
            args,
            {"data.manifest": args.manifest, "run.out_dir": args.out, "train.epochs": args.epochs},
        )
        if not cfg.data.manifest:
            raise ManifestError("no manifest: pass --manifest FILE.csv (make one with `python data/convert.py`)")
        Manifest.read(cfg.data.manifest)  # fail on a wrong path before a run folder is made
        run = start_stage_run(cfg, "segmentation")
        result = train_segmentation(cfg, run, resume=args.resume)
        if "rank" in result:  # another rank than 0 under torchrun: rank 0 reports
            return 0
        print(
            f"segmentation: best val Jaccard {result['best_val_jaccard']:.4f} at epoch {result['best_epoch']} "
            f"({result['epochs_run']} epochs run); checkpoint {result['checkpoint']}"
        )
        return 0

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
