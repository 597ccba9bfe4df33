"""Train one classifier backbone on the lesion crops: ``python classification/train.py --backbone densenet169``."""

from __future__ import annotations

from dermpipe.classification.config import ClassificationConfig
from dermpipe.classification.stage import train
from dermpipe.engine.cli import resolve_config, run_cli, stage_parser


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("classification", __doc__)
    parser.add_argument(
        "--manifest", help="crops manifest from segmentation/predict.py (or any manifest with --no-crop)"
    )
    parser.add_argument(
        "--backbone",
        help="resnet50, densenet169, inception_v3, inception_resnet_v2, xception, "
        "or any timm model name (model.backbone)",
    )
    parser.add_argument("--epochs", type=int, help="number of epochs (train.epochs), as segmentation/train.py takes")
    parser.add_argument("--folds", type=int, help="K-fold training on the train split with out-of-fold probabilities")
    parser.add_argument("--fold", type=int, help="with --folds: train only this fold (0..K-1)")
    parser.add_argument(
        "--fold-models",
        choices=("mean", "refit"),
        help="with --folds, the model of the val/test tables and of prediction: the mean of the K fold models "
        "(default), or one refitted on the whole training split (train.fold_models)",
    )
    parser.add_argument(
        "--no-crop",
        dest="crops",
        action="store_false",
        default=None,
        help="train on whole images (image_path) instead of lesion crops, for comparison",
    )
    parser.add_argument("--out", help="runs folder (default: run.out_dir); the run goes to OUT/<backbone>")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's last_state.pt")
    args = parser.parse_args(argv)

    def body() -> int:
        flags = {
            "data.manifest": args.manifest,
            "model.backbone": args.backbone,
            "train.epochs": args.epochs,
            "train.folds": args.folds,
            "train.fold": args.fold,
            "train.fold_models": args.fold_models,
            "data.crops": args.crops,
            "run.out_dir": args.out,
        }
        result = train(resolve_config(ClassificationConfig, args, flags), resume=args.resume)
        if result is not None:  # None: another rank than 0 under torchrun, where rank 0 reports
            print(result.line())
        return 0

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
