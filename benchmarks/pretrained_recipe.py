"""Fine-tuning ImageNet weights on the real sample's crops (BENCHMARKS.md, "Fine-tuning ImageNet weights"): the
BatchNorm recipe chosen on the validation split, then the chosen recipe against its own head-only epoch and against
the same network from scratch, at equal epochs and size, over seeds, on the test split.

python benchmarks/pretrained_recipe.py train --crops runs/pt/crops/crops.csv      # every (recipe, seed) run
python benchmarks/pretrained_recipe.py report                                     # the tables (Markdown, JSON)

``train`` runs ``classification/train.py`` once per recipe and seed into ``--out`` (default
``runs/bench/recipe/<backbone>_<size>/<recipe>_s<seed>``); a finished run is reused. The recipes:

- ``batch``, ``frozen``, ``reestimate``: the ImageNet weights (``model.pretrained: true``), one head-only epoch, then
  the whole network at lr x ``train.unfreeze_lr_scale`` with that ``train.batchnorm``;
- ``momentum``: ``batch`` with every backbone BatchNorm layer's momentum at 0.5 (timm's layers carry PyTorch's 0.1,
  the TF-ported ones too: a run at 0.1 is ``batch`` exactly), so that the running statistics follow the weights faster;
- ``flips``: ``frozen`` with flips as the only augmentation (the config's rotation, scale and shift, colour, blur and
  sharpening off), to check the augmentation strength on a pretrained start;
- ``head``: the head-only epoch alone (``train.epochs 1``): the same data order and learning rates as the first
  epoch of the others (the warm-up lasts one epoch), so it is the model each fine-tuning run had after that epoch;
- ``scratch``: random weights, batch statistics, no head-only epoch, everything else equal.

Every run: the same crops and input size, AdamW, cosine schedule, class-weighted cross-entropy, the config's default
augmentation, batch 64, patience off; the best epoch by validation balanced accuracy is kept, and the test split is
scored once per run (``probs_test.csv``). ``report`` picks the recipe with the highest mean validation balanced
accuracy over seeds and gives, for every recipe, the test balanced accuracy and macro AUC per seed, and the paired,
class-stratified bootstrap of the test images for the differences (the mean over seeds of each run's balanced accuracy,
all runs scored on the same resample).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

RECIPES = ("head", "batch", "frozen", "reestimate", "momentum", "flips", "scratch")
FLIPS_ONLY = [f"data.augment.{k}=0" for k in ("rotate_p", "affine_p", "colour_p", "blur_p", "sharpen_p")]
PRETRAINED = {
    "head": ["train.epochs=1", "train.freeze_epochs=1"],
    "batch": ["train.batchnorm=batch"],
    "frozen": ["train.batchnorm=frozen"],
    "reestimate": ["train.batchnorm=reestimate"],
    "momentum": ["train.batchnorm=batch", "train.bn_momentum=0.5"],
    "flips": ["train.batchnorm=frozen", *FLIPS_ONLY],
}


def _folder(args: argparse.Namespace) -> Path:
    return Path(args.out) / f"{args.backbone}_{args.size}"


def run_settings(args: argparse.Namespace, recipe: str, seed: int) -> list[str]:
    common = [f"data.image_size={args.size}", f"train.epochs={args.epochs}", f"train.batch_size={args.batch}",
              f"train.lr={args.lr}", "train.patience=0", "train.gradcam_images=0", f"run.seed={seed}",
              f"run.threads={args.threads}", f"run.cache_dir={args.cache}"]  # fmt: skip
    if recipe == "scratch":
        common += ["model.pretrained=false", "train.freeze_epochs=0", "train.batchnorm=batch"]
    else:
        common += ["model.pretrained=true", "train.freeze_epochs=1", *PRETRAINED[recipe]]
    return common


def train(args: argparse.Namespace) -> int:
    from dermpipe.classification import train as classification_train

    for seed in args.seeds:
        for recipe in args.recipes:
            out = _folder(args) / f"{recipe}_s{seed}"
            if (out / args.backbone / "probs_test.csv").is_file():
                print(f"{out}: finished, reused", flush=True)
                continue
            argv = ["--manifest", args.crops, "--backbone", args.backbone, "--out", str(out), "--device", "cpu"]
            for item in run_settings(args, recipe, seed):
                argv += ["--set", item]
            print("python classification/train.py " + " ".join(argv), flush=True)
            code = classification_train.main(argv)
            if code:
                return code
    return 0


def _read_probs(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image ids, label indices, probabilities) of a probability table (columns image_id, crop_key, label, classes)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        classes = [c for c in reader.fieldnames or [] if c not in ("image_id", "crop_key", "label")]
        rows = [r for r in reader if r["label"]]
    ids = [r["image_id"] for r in rows]
    labels = np.array([classes.index(r["label"]) for r in rows])
    probs = np.array([[float(r[c]) for c in classes] for r in rows])
    return ids, labels, probs


def _best_val(run: Path) -> float:
    with open(run / "metrics.csv", newline="") as f:
        return max(float(r["val_balanced_accuracy"]) for r in csv.DictReader(f))


def _stratified_draws(labels: np.ndarray, samples: int, seed: int) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    return [[rng.choice(m, size=m.size) for m in members] for _ in range(samples)]


def _balanced(correct: np.ndarray, draw: list[np.ndarray]) -> np.ndarray:
    """Balanced accuracy of each row of ``correct`` (runs x images) on one stratified draw."""
    return np.mean([correct[:, idx].mean(axis=1) for idx in draw], axis=0)


def report(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from dermpipe.ensemble.evaluation import method_metrics

    folder = _folder(args)
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    labels = ids = None
    for recipe in args.recipes:
        for seed in args.seeds:
            run = folder / f"{recipe}_s{seed}" / args.backbone
            if not (run / "probs_test.csv").is_file():
                continue
            run_ids, run_labels, probs = _read_probs(run / "probs_test.csv")
            if ids is None:
                ids, labels = run_ids, run_labels
            if run_ids != ids:
                raise SystemExit(f"{run}: another test set than the first run's")
            classes = json.loads((run / "probs_test.json").read_text()).get("classes")
            scores = method_metrics(labels, probs, classes or [str(i) for i in range(probs.shape[1])])
            runs.setdefault(recipe, {})[seed] = {
                "val": _best_val(run), "test": scores["balanced_accuracy"], "auc": scores["macro_auc"],
                "correct": probs.argmax(axis=1) == labels,
            }  # fmt: skip
    if labels is None:
        raise SystemExit(f"no finished run under {folder}")
    tuned = [r for r in runs if r not in ("head", "scratch", "flips")]  # the BatchNorm candidates
    chosen = max(tuned, key=lambda r: np.mean([v["val"] for v in runs[r].values()]))
    draws = _stratified_draws(labels, args.samples, 0)
    out: dict[str, Any] = {"backbone": args.backbone, "size": args.size, "epochs": args.epochs, "chosen": chosen,
                           "n_test": int(len(labels)), "recipes": {}, "differences": {}}  # fmt: skip
    lines = [
        f"| recipe ({args.backbone}, {args.size} px, {args.epochs} epochs) | seeds | val balanced accuracy (mean) "
        "| test balanced accuracy per seed | test mean | macro AUC mean |",
        "|---|---|---|---|---|---|",
    ]
    for recipe, by_seed in runs.items():
        seeds = sorted(by_seed)
        val = float(np.mean([by_seed[s]["val"] for s in seeds]))
        test = [by_seed[s]["test"] for s in seeds]
        auc = float(np.mean([by_seed[s]["auc"] for s in seeds]))
        out["recipes"][recipe] = {"seeds": seeds, "val_mean": val, "test": test, "auc_mean": auc}
        mark = " (chosen on val)" if recipe == chosen else ""
        lines.append(f"| {recipe}{mark} | {len(seeds)} | {val:.3f} | {' / '.join(f'{t:.3f}' for t in test)} | "
                     f"{np.mean(test):.3f} | {auc:.3f} |")  # fmt: skip
    lines += ["", "| difference on the test split (mean over the seeds both have) | point | 95% interval |",
              "|---|---|---|"]  # fmt: skip
    for recipe in [*tuned, *(["flips"] if "flips" in runs else [])]:
        others = (r for r in tuned if r != recipe and recipe == chosen)  # the chosen one against the other candidates
        for reference in ("frozen",) if recipe == "flips" else ("head", "scratch", *others):
            if reference not in runs:
                continue
            seeds = sorted(set(runs[recipe]) & set(runs[reference]))
            if not seeds:
                continue
            correct = np.stack([runs[name][s]["correct"] for name in (recipe, reference) for s in seeds])
            point = _balanced(correct, [np.arange(len(labels))[labels == c] for c in np.unique(labels)])
            boot = np.array([_balanced(correct, draw) for draw in draws])
            k = len(seeds)
            diff_point = float(point[:k].mean() - point[k:].mean())
            diffs = boot[:, :k].mean(axis=1) - boot[:, k:].mean(axis=1)
            low, high = (float(v) for v in np.quantile(diffs, [0.025, 0.975]))
            out["differences"][f"{recipe} - {reference}"] = {"seeds": seeds, "point": diff_point, "low": low,
                                                             "high": high}  # fmt: skip
            lines.append(f"| {recipe} minus {reference} ({len(seeds)} seeds) | {diff_point:+.3f} | "
                         f"{low:+.3f} to {high:+.3f} |")  # fmt: skip
    text = "\n".join(lines)
    print(text)
    (folder / "report.md").write_text(text + "\n")
    (folder / "report.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("train", "report"))
    parser.add_argument("--crops", default="runs/pt/crops/crops.csv", help="the crops manifest (segmentation/predict)")
    parser.add_argument("--out", default="runs/bench/recipe")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default="runs/bench/cache")
    parser.add_argument("--samples", type=int, default=1000, help="bootstrap resamples")
    args = parser.parse_args(argv)
    return train(args) if args.command == "train" else report(args)


if __name__ == "__main__":
    raise SystemExit(main())
