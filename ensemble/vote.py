"""Stage 3: learn the meta-network vote on held-out backbone probabilities and compare it with the baselines on test."""

from __future__ import annotations

import argparse
from dataclasses import replace

from dermpipe.engine.cli import resolve_config, run_cli, stage_parser
from dermpipe.ensemble.config import EnsembleConfig
from dermpipe.ensemble.stage import found_backbones, vote


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = stage_parser(
        "ensemble",
        "Stack the classifiers' probabilities, fit the locally connected meta-network and the baselines on the "
        "held-out split (settings chosen by cross-validation inside it), and score every method once on test.",
    )
    parser.add_argument(
        "--classification-root",
        help="folder holding <backbone>/probs_<split>.csv (default: ROOT/classification)",
    )
    parser.add_argument(
        "--backbones",
        help="comma-separated backbones to stack, in order, e.g. resnet50,xception (default: every backbone trained "
        "under ROOT/classification, the default five first)",
    )
    parser.add_argument(
        "--fit-split",
        choices=("val", "oof"),
        help="held-out probabilities to learn from: val, or oof (classification/train.py --folds K)",
    )
    parser.add_argument("--out", help="run folder to write methods.csv, meta.safetensors, ... into")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: _vote(args))


def _vote(args: argparse.Namespace) -> int:
    flags = {
        "data.classification_root": args.classification_root,
        "data.backbones": args.backbones,
        "data.fit_split": args.fit_split,
        "run.out_dir": args.out,
    }
    cfg = resolve_config(EnsembleConfig, args, flags)
    if not cfg.data.backbones:  # every backbone trained under the root, said aloud
        found, line = found_backbones(cfg)
        print(line)
        cfg = replace(cfg, data=replace(cfg.data, backbones=tuple(found)))
    print(vote(cfg).line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
