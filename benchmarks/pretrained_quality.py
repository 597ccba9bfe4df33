"""The pretrained preset on the real sample, end to end (BENCHMARKS.md, "The pretrained preset on the real sample";
``make bench QUALITY=pretrained``).

python benchmarks/pretrained_quality.py run --variant pretrained    # about 2 hours on two cores
python benchmarks/pretrained_quality.py run --variant scratch       # the same preset from random weights
python benchmarks/pretrained_quality.py run --variant cross         # trained on HAM10000-source images only

Each variant is one ``dermpipe run --config configs/presets/cpu-pretrained.yaml`` under ``runs/bench/pretrained/
<variant>`` (a finished stage is reused, an interrupted one resumes), then the U-Net's masks of the test split
(``segmentation/predict.py --split test --masks``) scored as ISIC scores them (``segmentation_quality.py score``).

- ``pretrained``: the preset as shipped, on ``runs/bench/isic_all.csv`` (the real sample with its grouped split).
- ``scratch``: the same with ``segmentation.model.encoder_weights=null`` and ``classification.model.pretrained=false``
  (then no head-only epoch and batch statistics: the settings' auto values for random weights).
- ``cross``: ``runs/bench/isic_cross.csv``: training and validation rows of the HAM10000-source images only; test rows
  of both sources (the HAM10000-source test split, and every ISIC 2018 Task 1-source image, none of which any stage
  trains or selects on), so one set of models is scored in source and across sources.

Each stage's seconds are added to ``ROOT/times.json`` as it finishes (a resumed stage adds its remaining part).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from segmentation_quality import main as segmentation_quality  # noqa: E402
from segmentation_quality import real_sample_manifest  # noqa: E402

from dermpipe.ensemble import pipeline  # noqa: E402
from dermpipe.errors import DermpipeError  # noqa: E402
from dermpipe.segmentation import predict as segmentation_predict  # noqa: E402

PRESET = HERE.parent / "configs" / "presets" / "cpu-pretrained.yaml"
SCRATCH = ["segmentation.model.encoder_weights=null", "classification.model.pretrained=false"]
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


class TimedSteps(pipeline.Steps):
    """``dermpipe run``'s steps, each one's seconds added to ``times.json`` as soon as it ends."""

    path: Path

    def __call__(self, name, main, argv):  # type: ignore[no-untyped-def]
        try:
            super().__call__(name, main, argv)
        finally:
            times = json.loads(self.path.read_text()) if self.path.is_file() else {}
            times[name] = round(times.get(name, 0.0) + self.times[-1][1], 1)
            self.path.write_text(json.dumps(times, indent=1) + "\n")


def run(args: argparse.Namespace) -> int:
    whole = Path(args.manifest)
    if not whole.is_file():
        real_sample_manifest(Path(args.data), whole)
    manifest = cross_manifest(whole, whole.with_name("isic_cross.csv")) if args.variant == "cross" else whole
    root = Path(args.out) / args.variant
    root.mkdir(parents=True, exist_ok=True)
    TimedSteps.path = root / "times.json"
    pipeline.Steps = TimedSteps  # type: ignore[misc]
    argv = ["--manifest", str(manifest), "--root", str(root), "--config", str(PRESET), "--device", "cpu"]
    for item in SCRATCH if args.variant == "scratch" else []:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="one variant end to end")
    r.add_argument("--variant", choices=("pretrained", "scratch", "cross"), required=True)
    r.add_argument("--data", default="../shared/data/isic_real")
    r.add_argument("--manifest", default="runs/bench/isic_all.csv", help="the real sample manifest (made if missing)")
    r.add_argument("--out", default="runs/bench/pretrained")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except DermpipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
