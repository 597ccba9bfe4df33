"""The pretrained preset on the real sample, end to end (BENCHMARKS.md, "The pretrained preset on the real sample";
``make bench QUALITY=pretrained``).

python benchmarks/pretrained_quality.py run --variant pretrained    # about an hour on two cores
python benchmarks/pretrained_quality.py run --variant scratch       # the same preset from random weights
python benchmarks/pretrained_quality.py run --variant cross         # trained on HAM10000-source images only

Each variant is one ``dermpipe run --config configs/presets/cpu-pretrained.yaml`` under ``runs/bench/pretrained/
<variant>`` (a finished stage is reused, an interrupted one resumes), then the U-Net's masks of the test split
(``segmentation/predict.py --split test --masks``) scored as ISIC scores them (``segmentation_quality.py score``).

- ``pretrained``: the preset as shipped, on ``runs/bench/isic_all.csv`` (the real sample with its grouped split).
- ``scratch``: the same classifiers with ``classification.model.pretrained=false`` (then no head-only epoch and batch
  statistics: the settings' auto values for random weights), on the pretrained variant's crops (its ``crops.csv``):
  its finished U-Net and crops are copied into the scratch root, so the two votes differ only in the classifiers'
  starting weights (ResNet-18 and MobileNetV3-Small train again there, with the same settings and seed). The
  U-Net from scratch against a pretrained encoder is compared on its own (BENCHMARKS.md, "Fine-tuning ImageNet
  weights").
- ``cross``: ``runs/bench/isic_cross.csv``: training and validation rows of the HAM10000-source images only; test rows
  of both sources (the HAM10000-source test split, and every ISIC 2018 Task 1-source image, none of which any stage
  trains or selects on), so one set of models is scored in source and across sources.

Each stage's seconds are added to ``ROOT/times.json`` as it finishes (a resumed stage adds its remaining part).

python benchmarks/pretrained_quality.py tables --tables BENCHMARKS.md

``tables`` scores every finished variant from its files: the U-Net's test Jaccard and thresholded Jaccard; for each
classifier, the mean vote and the learned vote, the test balanced accuracy, macro AUC and melanoma sensitivity at the
refer threshold (the share of melanomas predicted as melanoma or referred; a classifier's and the mean vote's
threshold is set on the validation split for the ensemble config's target sensitivity, as the vote's own is), each
with a 95% interval from a class-stratified bootstrap of the test images, and the seconds of each stage. The cross
variant is scored on its HAM10000-source test rows (in source) and on its ISIC 2018 Task 1-source rows (across
sources). ``--tables FILE`` writes them between the ``make bench QUALITY=pretrained`` markers of FILE.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from segmentation_quality import main as segmentation_quality  # noqa: E402
from segmentation_quality import real_sample_manifest  # noqa: E402

from dermpipe.configs.schema import ROOT_LAYOUT  # noqa: E402
from dermpipe.errors import DermpipeError  # noqa: E402
from dermpipe.pipeline import run as pipeline  # noqa: E402
from dermpipe.segmentation import predict as segmentation_predict  # noqa: E402

PRESET = HERE.parent / "configs" / "presets" / "cpu-pretrained.yaml"
SCRATCH = ["classification.model.pretrained=false"]
CROSS_TEST_SOURCE = "ISIC2018_Task1_train"


def cross_manifest(whole: Path, out: Path) -> Path:
    """``whole`` with every ISIC 2018 Task 1-source row moved to the test split (none trains, none selects)."""
    with open(whole, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames or [], list(reader)
    for row in rows:
        if row["dataset"] == CROSS_TEST_SOURCE:
            row["split"] = "test"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return out


def share_pretrained_stages(pretrained: Path, root: Path) -> None:
    """Copy the pretrained variant's finished U-Net and crops into the scratch root (once, before its first run);
    ``dermpipe run`` reuses them when their settings and data match (and refuses, naming them, when they do not). Its
    classifiers are not copied: each records the crops of its own root, so all five train in the scratch root."""
    if root.exists():
        return
    crops = pretrained / ROOT_LAYOUT["crops"] / "crops.csv"
    if not crops.is_file():
        raise DermpipeError(f"{crops} is missing: the scratch variant classifies the pretrained variant's crops; run "
                            "`python benchmarks/pretrained_quality.py run --variant pretrained` first")  # fmt: skip
    folders = [ROOT_LAYOUT["segmentation"], ROOT_LAYOUT["crops"]]
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for folder in folders:
        shutil.copytree(pretrained / folder, partial / folder)
    partial.rename(root)
    print(f"scratch: copied {', '.join(folders)} from {pretrained}")


class TimedSteps(pipeline.Steps):
    """``dermpipe run``'s steps, each one's seconds added to ``times.json`` as soon as it ends."""

    path: Path

    def __call__(self, name: str, stage: Callable[[], Any], resumed: bool = False) -> Any:
        done = len(self.times)
        try:
            return super().__call__(name, stage, resumed)
        finally:
            if len(self.times) > done:  # it finished (a stage that failed has no time to add)
                times = json.loads(self.path.read_text()) if self.path.is_file() else {}
                times[name] = round(times.get(name, 0.0) + self.times[-1][1], 1)
                self.path.write_text(json.dumps(times, indent=1) + "\n")


def run(args: argparse.Namespace) -> int:
    whole = Path(args.manifest)
    if not whole.is_file():
        real_sample_manifest(Path(args.data), whole)
    manifest = cross_manifest(whole, whole.with_name("isic_cross.csv")) if args.variant == "cross" else whole
    root = Path(args.out) / args.variant
    if args.variant == "scratch":
        share_pretrained_stages(Path(args.out) / "pretrained", root)
    root.mkdir(parents=True, exist_ok=True)
    TimedSteps.path = root / "times.json"
    pipeline.Steps = TimedSteps  # type: ignore[misc]
    argv = ["--manifest", str(manifest), "--root", str(root), "--config", str(PRESET), "--device", "cpu"]
    for item in [*(SCRATCH if args.variant == "scratch" else []), *args.sets]:
        argv += ["--set", item]
    if pipeline.main(argv) != 0:
        return 1
    masks = root / "seg_test"
    if not (masks / "masks").is_dir():
        code = segmentation_predict.main(["--manifest", str(manifest), "--root", str(root), "--split", "test",
                                          "--out", str(masks), "--masks", "--device", "cpu"])  # fmt: skip
        if code:
            return code
    return segmentation_quality(["score", "--manifest", str(manifest), "--split", "test", "--pred",
                                 str(masks / "masks"), "--json", str(root / "seg_test.json")])  # fmt: skip


BEGIN, END = "<!-- make bench QUALITY=pretrained: begin -->", "<!-- make bench QUALITY=pretrained: end -->"
VARIANTS = {"pretrained": "ImageNet weights (the preset)", "scratch": "from scratch (the same preset)",
            "cross": "ImageNet weights, trained on HAM10000-source images only"}  # fmt: skip


def _interval(values: np.ndarray, signed: bool = False) -> str:
    low, high = np.quantile(values, [0.025, 0.975])
    return f"{low:+.3f} to {high:+.3f}" if signed else f"{low:.3f}-{high:.3f}"


def score_methods(methods: dict[str, tuple[np.ndarray, float]], labels: np.ndarray, classes: list[str],
                  samples: int = 1000) -> list[list[str]]:  # fmt: skip
    """One row per method (test probabilities, refer threshold): balanced accuracy, macro AUC and melanoma sensitivity
    at the refer threshold, each with its 95% interval over the same class-stratified resamples of the test images."""
    from dermpipe.ensemble.calibration import referral_outcome
    from dermpipe.ensemble.evaluation import method_metrics

    mel = classes.index("mel")
    draws = _draws(labels, samples)
    rows = []
    for name, (probs, threshold) in methods.items():
        point = method_metrics(labels, probs, classes)
        sens = referral_outcome(probs, labels, mel, threshold)
        boot = np.array([(m["balanced_accuracy"], m["macro_auc"], referral_outcome(probs[d], labels[d], mel,
                          threshold)["sensitivity_with_referral"]) for d in draws
                         for m in [method_metrics(labels[d], probs[d], classes)]])  # fmt: skip
        rows.append([name, f"{point['balanced_accuracy']:.3f} ({_interval(boot[:, 0])})",
                     f"{point['macro_auc']:.3f} ({_interval(boot[:, 1])})",
                     f"{sens['sensitivity_with_referral']:.3f} ({_interval(boot[:, 2])})",
                     f"{sens['referred_fraction']:.1%}"])  # fmt: skip
    return rows


def variant_methods(root: Path, rows: set[str] | None = None) -> tuple[dict, np.ndarray, list[str]]:
    """Every classifier's, the mean vote's and the learned vote's test probabilities and refer thresholds
    (``rows``: only these test image ids)."""
    from dermpipe.configs.loader import load_yaml
    from dermpipe.ensemble.calibration import refer_threshold
    from dermpipe.ensemble.stacked_tables import load_probability_tables

    summary = json.loads((root / "ensemble" / "summary.json").read_text())
    backbones = list(summary["backbones"])
    target = float(load_yaml(str(PRESET)).get("ensemble", {}).get("calibration", {}).get("target_sensitivity", 0.95))
    val = load_probability_tables(root / "classification", backbones, "val").labelled()
    test = load_probability_tables(root / "classification", backbones, "test").labelled()
    keep = np.array([rows is None or i in rows for i in test.ids])
    classes, labels = list(test.classes), test.labels[keep]
    mel = classes.index("mel")
    methods = {}
    for b, name in enumerate(backbones):
        methods[name] = (test.probs[keep, b], refer_threshold(val.probs[:, b], val.labels, mel, target))
    methods["mean vote"] = (test.probs[keep].mean(axis=1), refer_threshold(val.probs.mean(axis=1), val.labels, mel,
                                                                           target))  # fmt: skip
    with open(root / "ensemble" / "test_predictions.csv", newline="") as f:
        by_id = {r["image_id"]: [float(r[c]) for c in classes] for r in csv.DictReader(f)}
    vote = np.array([by_id[i] for i, k in zip(test.ids, keep) if k])
    methods["learned vote (meta-network, calibrated)"] = (vote, float(summary["refer_threshold"]))
    return methods, labels, classes


def _draws(labels: np.ndarray, samples: int) -> list[np.ndarray]:
    """The class-stratified resamples of the test images every interval uses (seed 0, so tables are repeatable)."""
    rng = np.random.default_rng(0)
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    return [np.concatenate([rng.choice(m, size=m.size) for m in members]) for _ in range(samples)]


def _balanced_accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.mean([(predicted[labels == c] == c).mean() for c in np.unique(labels)]))


def paired_rows(first: dict[str, tuple[np.ndarray, float]], second: dict[str, tuple[np.ndarray, float]],
                labels: np.ndarray, samples: int = 1000) -> list[list[str]]:  # fmt: skip
    """For each method in both (same test images, same order): balanced accuracy of ``first``, of ``second`` and their
    difference with its 95% interval over paired class-stratified resamples; then the best single classifier of each
    (not a vote) against the other's best."""
    draws = _draws(labels, samples)

    def row(name: str, a: np.ndarray, b: np.ndarray) -> list[str]:
        pa, pb = a.argmax(axis=1), b.argmax(axis=1)
        diff = [_balanced_accuracy(labels[d], pa[d]) - _balanced_accuracy(labels[d], pb[d]) for d in draws]
        ba, bb = _balanced_accuracy(labels, pa), _balanced_accuracy(labels, pb)
        return [name, f"{ba:.3f}", f"{bb:.3f}", f"{ba - bb:+.3f} ({_interval(np.array(diff), signed=True)})"]

    rows = [row(name, first[name][0], second[name][0]) for name in first if name in second]
    singles = [n for n in first if n in second and "vote" not in n]
    if singles:
        best_a = max(singles, key=lambda n: _balanced_accuracy(labels, first[n][0].argmax(axis=1)))
        best_b = max(singles, key=lambda n: _balanced_accuracy(labels, second[n][0].argmax(axis=1)))
        rows.append(row(f"best single: {best_a} against {best_b}", first[best_a][0], second[best_b][0]))
    return rows


VARIANT_BLOCK = "<!-- {}: {} -->"


def previous_blocks(text: str) -> dict[str, str]:
    """The blocks an earlier ``tables`` wrote, by name: a variant whose run root is gone keeps its figures."""
    found = {}
    for name in [*VARIANTS, "comparison"]:
        begin, end = VARIANT_BLOCK.format(name, "begin"), VARIANT_BLOCK.format(name, "end")
        if begin in text and end in text:
            found[name] = text[text.index(begin) : text.index(end) + len(end)]
    return found


def variant_block(root: Path, variant: str, samples: int) -> str:
    """One variant's tables: classifiers and votes (the cross variant: in source and across), U-Net, minutes."""
    header = ["| model | balanced accuracy | macro AUC | melanoma sensitivity at the refer threshold | referred |",
              "|---|---|---|---|---|"]  # fmt: skip
    seg = json.loads((root / "seg_test.json").read_text()) if (root / "seg_test.json").is_file() else {}
    times = json.loads((root / "times.json").read_text()) if (root / "times.json").is_file() else {}
    parts: dict[str, set[str] | None] = {"": None}
    if variant == "cross":
        with open(root.parent.parent / "isic_cross.csv", newline="") as f:
            source = {r["image_id"]: r["dataset"] for r in csv.DictReader(f) if r["split"] == "test"}
        parts = {f" on {name} test images": {i for i, d in source.items() if (d == CROSS_TEST_SOURCE) == cross}
                 for name, cross in (("HAM10000-source", False), ("ISIC 2018 Task 1-source", True))}  # fmt: skip
    lines = [VARIANT_BLOCK.format(variant, "begin")]
    for part, rows in parts.items():
        methods, labels, classes = variant_methods(root, rows)
        lines += [f"**{VARIANTS[variant]}{part}** ({len(labels)} test images)", "", *header]
        lines += [f"| {' | '.join(r)} |" for r in score_methods(methods, labels, classes, samples)]
        lines.append("")
    if seg:
        lines.append(f"U-Net test Jaccard {seg['jaccard']:.4f}, thresholded Jaccard "
                     f"{seg['thresholded_jaccard']:.4f} ({seg['images']} images).")  # fmt: skip
    elif variant == "scratch":
        lines.append("U-Net and crops: the pretrained variant's (copied, not retrained).")
    if times:
        total = sum(times.values())
        lines.append(f"Minutes per stage: {'; '.join(f'`{k}` {v / 60:.1f}' for k, v in times.items())}; "
                     f"all {total / 60:.0f}.")  # fmt: skip
    return "\n".join([*lines, VARIANT_BLOCK.format(variant, "end")])


def comparison_block(out: Path, samples: int) -> str:
    """The pretrained variant against the scratch one, network by network and vote by vote, paired."""
    first, labels, _ = variant_methods(out / "pretrained")
    second, other, _ = variant_methods(out / "scratch")
    if not np.array_equal(labels, other):
        raise DermpipeError("the pretrained and scratch variants were scored on different test images")
    rows = paired_rows(first, second, labels, samples)
    return "\n".join([VARIANT_BLOCK.format("comparison", "begin"),
                      f"**ImageNet weights against scratch, paired** ({len(labels)} test images; test balanced "
                      "accuracy; difference with its 95% interval over paired resamples)", "",
                      "| model | pretrained | scratch | difference |", "|---|---|---|---|",
                      *(f"| {' | '.join(r)} |" for r in rows), VARIANT_BLOCK.format("comparison", "end")])  # fmt: skip


def tables(args: argparse.Namespace) -> int:
    out = Path(args.out)
    path = Path(args.tables) if args.tables else None
    before = previous_blocks(path.read_text() if path and path.is_file() else "")
    lines = ["`python benchmarks/pretrained_quality.py run --variant VARIANT` for each variant, then `python "
             "benchmarks/pretrained_quality.py tables --tables BENCHMARKS.md`; intervals: 95%, class-stratified "
             f"bootstrap of the test images ({args.samples:,} resamples); melanoma sensitivity: melanomas predicted "
             "as melanoma or referred at the refer threshold (set on the validation split), with the share of test "
             "images referred. A variant whose run root is absent keeps the figures an earlier run wrote.",
             ""]  # fmt: skip
    finished = {v for v in VARIANTS if (out / v / "ensemble" / "summary.json").is_file()}
    for name in [*VARIANTS, "comparison"]:
        if args.only and name not in args.only and name in before:
            block = before[name]
        elif name == "comparison":
            block = comparison_block(out, args.samples) if {"pretrained", "scratch"} <= finished else None
        else:
            block = variant_block(out / name, name, args.samples) if name in finished else None
        block = block or before.get(name)
        if block:
            lines += [block, ""]
    table = f"{BEGIN}\n" + "\n".join(lines) + f"\n{END}"
    print(table)
    if path:
        from quick_synthetic import write_tables

        write_tables(path, table, BEGIN, END, "## The pretrained preset on the real sample")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="one variant end to end")
    r.add_argument("--variant", choices=("pretrained", "scratch", "cross"), required=True)
    r.add_argument("--data", default="../shared/data/isic_real")
    r.add_argument("--manifest", default="runs/bench/isic_all.csv", help="the real sample manifest (made if missing)")
    r.add_argument("--out", default="runs/bench/pretrained")
    r.add_argument("--set", dest="sets", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="more settings for `dermpipe run` (e.g. classification.run.threads=1 when two variants share "
                        "two cores)")  # fmt: skip
    t = sub.add_parser("tables", help="the tables of every finished variant")
    t.add_argument("--out", default="runs/bench/pretrained")
    t.add_argument("--samples", type=int, default=1000, help="bootstrap resamples")
    t.add_argument("--tables", help="write them into this Markdown file (BENCHMARKS.md) between the markers")
    t.add_argument("--only", nargs="+", choices=[*VARIANTS, "comparison"],
                   help="score only these blocks; the others keep what the file holds (default: every finished "
                        "one)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        return run(args) if args.command == "run" else tables(args)
    except DermpipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
