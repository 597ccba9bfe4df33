"""A HAM10000-layout sample of the real ISIC data (symbolic links, nothing copied), for docs/quickstart.md:

python benchmarks/ham_layout.py --root ../shared/data/isic_real --out runs/bench/HAM10000 --n 500

writes ``OUT/HAM10000_images_part_1/ISIC_x.jpg``, ``OUT/HAM10000_segmentations_lesion_tschandl/ISIC_x_segmentation.png``
(links to the real files) and ``OUT/HAM10000_metadata.csv`` (lesion_id, image_id, dx), as HAM10000 is published, for a
random sample of ``--n`` labelled images drawn whole lesions at a time. ``python data/convert.py --format ham10000
--root OUT`` then reads it as it reads the real HAM10000.
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import numpy as np


def write_layout(root: Path, out: Path, n: int, seed: int = 0) -> int:
    with open(root / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["dx"] and r["has_mask"] == "1"]
    lesions: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        lesions.setdefault(r["group"], []).append(r)
    order = np.random.default_rng(seed).permutation(sorted(lesions))
    chosen: list[dict[str, str]] = []
    for group in order:
        if len(chosen) >= n:
            break
        chosen.extend(lesions[str(group)])
    images, masks = out / "HAM10000_images_part_1", out / "HAM10000_segmentations_lesion_tschandl"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for r in chosen:
        for link, target in (
            (images / f"{r['image_id']}.jpg", root / "images" / f"{r['image_id']}.jpg"),
            (masks / f"{r['image_id']}_segmentation.png", root / "masks" / f"{r['image_id']}_segmentation.png"),
        ):
            if not link.is_symlink():
                os.symlink(target.resolve(), link)
    with open(out / "HAM10000_metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset"])
        for r in chosen:
            writer.writerow([r["group"], r["image_id"], r["dx"], "", "", "", "", r["dataset"]])
    return len(chosen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="the real sample (images/, masks/, labels.csv)")
    parser.add_argument("--out", required=True, help="folder for the HAM10000 layout")
    parser.add_argument("--n", type=int, default=500, help="about this many images, whole lesions at a time")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    count = write_layout(Path(args.root), Path(args.out), args.n, args.seed)
    print(f"wrote a HAM10000 layout of {count} real images to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
