"""Stage 3: learn the meta-network vote on held-out backbone probabilities and compare it with the baselines on test."""

from __future__ import annotations

import argparse
from dataclasses import replace

from dermpipe.classification.backbones import DEFAULT_BACKBONES
from dermpipe.engine.cli import resolve_config, run_cli, stage_parser
from dermpipe.engine.run import start_stage_run
from dermpipe.ensemble.config import EnsembleConfig
from dermpipe.ensemble.stacked_tables import TableError, trained_backbones
from dermpipe.ensemble.voting import run_vote


def found_backbones(cfg: EnsembleConfig) -> list[str]:
    """The backbones trained under the classification root, with the defaults that are not; none is an error."""
    root, split = cfg.data.classification_root, cfg.data.fit_split
    found = trained_backbones(root, split)
    if not found:
        raise TableError(
            f"no trained backbone under {root} (no <backbone>/probs_{split}.csv): train one with "
            f"`python classification/train.py --backbone NAME --root {cfg.run.root}`, or pass --root (the run root) "
            "or --classification-root (the folder of backbone runs)"
        )
    missing = [b for b in DEFAULT_BACKBONES if b not in found]
    print(f"vote: stacking the {len(found)} backbones trained under {root}: {', '.join(found)}"
          + (f" (defaults not trained: {', '.join(missing)})" if missing else ""))  # fmt: skip
    return found


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
        cfg = replace(cfg, data=replace(cfg.data, backbones=tuple(found_backbones(cfg))))
    run = start_stage_run(cfg, "ensemble")
    summary = run_vote(cfg, run)
    rows = {row["method"]: row for row in summary["methods"]}
    scores = {name: row["balanced_accuracy"] for name, row in rows.items()}
    meta = rows["meta_network"]
    interval = (
        f" (difference {meta['delta_vs_best_single']:+.4f}, {cfg.evaluation.confidence:.0%} bootstrap interval "
        f"{meta['delta_low']:+.4f} to {meta['delta_high']:+.4f})"
        if "delta_low" in meta
        else ""
    )
    versus = summary.get("meta_network_vs", {}).get("mean_vote")
    against_mean = (
        f" (meta-network {versus['difference']:+.4f}, interval {versus['low']:+.4f} to {versus['high']:+.4f})"
        if versus
        else ""
    )
    referral = summary["referral_test"]
    missed = f", BELOW the {summary['target_sensitivity']:.2f} target" if summary.get("target_missed") else ""
    refer = (
        f"; {referral['referred_fraction']:.0%} referred below top probability {summary['refer_threshold']:.3f} "
        f"({cfg.calibration.refer_class} sensitivity {referral['sensitivity_with_referral']:.3f}{missed})"
        if referral
        else ""
    )
    print(
        f"meta-network balanced accuracy {scores['meta_network']:.4f} vs best single backbone "
        f"{summary['best_single']} {scores['best_single']:.4f}{interval}; "
        f"mean vote {scores['mean_vote']:.4f}{against_mean}, "
        f"logistic stacking {scores['logistic_stacking']:.4f}; {summary['n_test']} test images{refer}; "
        f"wrote {summary['paths']['methods']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
