"""Score a folder of predicted lesion masks against the true ones with the ISIC challenge metrics:
``python segmentation/score.py TRUTH_DIR PRED_DIR [--csv scores.csv]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dermpipe.engine import csvsafe
from dermpipe.engine.files import atomic_path
from dermpipe.segmentation.metrics import METRICS, MaskScoringError, score_folders


def write_per_image_csv(path: Path, per_image: list[tuple[str, dict[str, float]]]) -> None:
    """One row per image: ``image_id`` and the six metrics, written to a temporary name and renamed."""
    with atomic_path(path) as partial, partial.open("w", newline="") as handle:
        writer = csvsafe.Writer(handle)
        writer.writerow(["image_id", *METRICS])
        for image_id, scores in per_image:
            writer.writerow([image_id, *(repr(scores[name]) for name in METRICS)])


def format_table(means: dict[str, float], image_count: int) -> str:
    """The mean of each metric, one per line, then the number of images scored."""
    width = max(len(name) for name in METRICS)
    lines = [f"{'metric':<{width}}  mean"]
    lines += [f"{name:<{width}}  {means[name]:.6f}" for name in METRICS]
    lines.append(f"{'images':<{width}}  {image_count}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Score predicted lesion masks against true ones as the ISIC challenge does (ISIC 2017 Part 1, "
        "ISIC 2018 Task 1): per-image Jaccard, thresholded Jaccard (below 0.65 counts 0), Dice, sensitivity, "
        "specificity and accuracy, averaged over images. Masks are 8-bit greyscale (0/255, above 128 is lesion) at "
        "the original image size, paired by the ISIC id in their names (else by the same file stem)."
    )
    parser.add_argument("truth_dir", type=Path, help="folder of true masks, e.g. ISIC_0000000_segmentation.png")
    parser.add_argument("pred_dir", type=Path, help="folder of predicted masks, one per true mask")
    parser.add_argument("--csv", type=Path, default=None, help="also write the per-image scores to this CSV file")
    args = parser.parse_args(argv)

    try:
        per_image, means = score_folders(args.truth_dir, args.pred_dir, progress=True)
    except MaskScoringError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(means, len(per_image)))
    if args.csv is not None:
        try:
            write_per_image_csv(args.csv, per_image)
        except OSError as error:
            print(f"error: cannot write per-image scores to {args.csv}: {error.strerror}", file=sys.stderr)
            return 2
        print(f"per-image scores written to {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
