"""Convert a public dermoscopy dataset layout into one manifest CSV (plus its class sidecar) with a leak-free split."""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from dermpipe.data.formats import BUILTIN_MAPS, FORMATS, ConversionError, convert_dataset, parse_class_map
from dermpipe.data.manifest import SPLITS, Manifest, ManifestError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Read a dataset as published (any unzip depth) and write one manifest row per image.",
        epilog="example: python data/convert.py --format ham10000 --root ~/HAM10000 --out runs/ham.csv",
    )
    parser.add_argument("--format", required=True, help=f"dataset layout: {', '.join(FORMATS)}")
    parser.add_argument("--root", required=True, help="folder the dataset was unzipped into (searched recursively)")
    parser.add_argument("--out", required=True, help="manifest CSV to write; the class list goes beside it as .json")
    parser.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="MAP",
        help=f"rename classes: a built-in map ({', '.join(BUILTIN_MAPS)}), a .yaml/.json file or pairs "
        "like AK=akiec,SCC=akiec; repeatable; every class that has images must be mapped or dropped",
    )
    parser.add_argument(
        "--drop", action="append", default=[], metavar="CLASS", help="leave out a class (counted); repeatable"
    )
    parser.add_argument(
        "--fractions",
        nargs=3,
        type=float,
        default=[0.7, 0.15, 0.15],
        metavar=("TRAIN", "VAL", "TEST"),
        help="split shares, stratified by class and grouped by lesion/patient (default 0.7 0.15 0.15)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    parser.add_argument("--folds", type=int, default=0, help="also add a fold column 0..K-1 over the train rows")
    official = parser.add_mutually_exclusive_group()
    official.add_argument(
        "--keep-official",
        dest="keep_official",
        action="store_true",
        default=True,
        help="keep the dataset's official split where it has one (default)",
    )
    official.add_argument(
        "--resplit", dest="keep_official", action="store_false", help="ignore any official split and split afresh"
    )
    return parser


def split_table(manifest: Manifest) -> list[str]:
    """Lines of a class x split count table, unlabelled images last."""
    counts = Counter((r.get("label", ""), r.get("split", "")) for r in manifest.rows)
    names = [*manifest.classes, ""]
    width = max([len(c) for c in manifest.classes] + [len("(unlabelled)")])
    lines = [f"{'class':<{width}} " + " ".join(f"{s:>6}" for s in (*SPLITS, "total"))]
    for name in names:
        per_split = [counts[(name, s)] for s in SPLITS]
        if name == "" and not sum(per_split):
            continue
        lines.append(f"{name or '(unlabelled)':<{width}} " + " ".join(f"{n:>6}" for n in (*per_split, sum(per_split))))
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    drop = [c.strip() for spec in args.drop for c in spec.split(",") if c.strip()]
    try:
        manifest, report = convert_dataset(
            args.format,
            args.root,
            class_map=parse_class_map(args.map),
            drop=drop,
            fractions=args.fractions,
            seed=args.seed,
            keep_official=args.keep_official,
            folds=args.folds,
        )
        out = manifest.write(args.out)
    except (ConversionError, ManifestError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: cannot write {args.out}: {error.strerror}", file=sys.stderr)
        return 2
    per_split = Counter(r.get("split", "") for r in manifest.rows)
    print(
        f"{args.format}: {len(manifest)} images, {report.labelled} labelled, {len(manifest.classes)} classes, "
        f"{report.masks_found} masks -> {out} (" + ", ".join(f"{s} {per_split[s]}" for s in SPLITS) + ")"
    )
    for line in split_table(manifest) + report.describe():
        print(f"  {line}")
    if gaps := missing_classes(manifest):
        print(f"warning: {gaps}", file=sys.stderr)
    return 0


def missing_classes(manifest: Manifest) -> str:
    """One line naming the classes each split of the manifest lacks (a split without a class can neither train nor
    score it), or ``""`` when every split that has images has every class."""
    labelled = Counter((r.get("label", ""), r.get("split", "")) for r in manifest.rows if r.get("label"))
    used = [s for s in SPLITS if any(split == s for _, split in labelled)]
    gaps = [(s, [c for c in manifest.classes if not labelled[(c, s)]]) for s in used]
    gaps = [(s, missing) for s, missing in gaps if missing]
    if not gaps:
        return ""
    listed = "; ".join(f"{s} has no {', '.join(missing)}" for s, missing in gaps)
    return (f"not every class is in every split: {listed} (its recall there cannot be measured: add images of the "
            "class, --drop it, or --resplit with other --fractions)")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
