"""Train one classifier backbone on the lesion crops: ``python classification/train.py --backbone densenet169``."""

from __future__ import annotations

from pathlib import Path

from dermpipe.classification.config import ClassificationConfig
from dermpipe.classification.training import run_classification
from dermpipe.engine.cli import MissingInputError, resolve_config, run_cli, stage_parser


def _score(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "n/a"


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
        cfg = resolve_config(ClassificationConfig, args, flags)
        if not Path(cfg.data.manifest).is_file():
            raise MissingInputError(
                f"no crops manifest at {cfg.data.manifest}: make it with `python segmentation/predict.py --manifest "
                f"FILE --root {cfg.run.root}`, or pass --manifest FILE (any manifest, with --no-crop for whole images)"
            )
        result = run_classification(cfg, resume=args.resume)
        if "rank" in result:  # another rank than 0 under torchrun: rank 0 reports
            return 0
        scores = (
            f"val balanced accuracy {_score(result['val_balanced_accuracy'])}, "
            f"test balanced accuracy {_score(result['test_balanced_accuracy'])}; wrote {result['run_dir']}"
        )
        if result.get("combined"):
            model = (
                f"the mean of the {cfg.train.folds} fold models"
                if result["fold_models"] == "mean"
                else f"refitted on the whole training split, best epoch {result['best_epoch']}"
            )
            print(
                f"classification {cfg.model.backbone} over {cfg.train.folds} folds: out-of-fold balanced accuracy "
                f"{_score(result.get('oof_balanced_accuracy'))}; {model}: {scores}"
            )
        else:
            print(f"classification {cfg.model.backbone}: best epoch {result['best_epoch']}, {scores}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
