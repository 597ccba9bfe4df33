"""Command line: write a synthetic dermoscopy data set (images, exact masks, manifest.csv) into a folder."""

from __future__ import annotations

import argparse
import sys

from dermpipe.data.generator import DEFAULT_CLASSES, IMAGE_FORMATS, SyntheticDataError, generate_dataset
from dermpipe.data.manifest import Manifest, ManifestError


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, write the data set and print one summary line; 2 with one error line on bad input."""
    parser = argparse.ArgumentParser(description="Write a synthetic dermoscopy data set: images, masks, manifest.csv.")
    parser.add_argument("--out", required=True, help="folder to write images/, masks/ and manifest.csv into")
    parser.add_argument("--n", type=int, default=200, help="number of images (default 200)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    parser.add_argument(
        "--classes", default=",".join(DEFAULT_CLASSES), help="comma-separated class names, majority first"
    )
    parser.add_argument("--imbalance", type=float, default=4.0, help="most over least frequent class (default 4)")
    parser.add_argument(
        "--images-per-lesion", default="1,3", help="views per lesion id: low,high or one number (default 1,3)"
    )
    parser.add_argument("--hair", type=float, default=0.3, help="chance of hair per image (default 0.3)")
    parser.add_argument("--vignette", type=float, default=0.5, help="chance of dermatoscope vignetting (default 0.5)")
    parser.add_argument("--ruler", type=float, default=0.1, help="chance of ruler marks per image (default 0.1)")
    parser.add_argument("--format", choices=IMAGE_FORMATS, default="jpg", help="image file format (default jpg)")
    args = parser.parse_args(argv)
    try:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
        try:
            bounds = [int(v) for v in args.images_per_lesion.split(",")]
            lo, hi = bounds if len(bounds) == 2 else (bounds[0], bounds[0]) if len(bounds) == 1 else (0, -1)
        except ValueError:
            lo, hi = 0, -1
        if lo < 1 or hi < lo:
            raise SyntheticDataError(
                f"--images-per-lesion {args.images_per_lesion!r} must be one number or two like 1,3 (low <= high)"
            )
        path = generate_dataset(
            args.out,
            n_images=args.n,
            size=args.size,
            seed=args.seed,
            classes=classes,
            imbalance=args.imbalance,
            images_per_lesion=(lo, hi),
            hair=args.hair,
            vignette=args.vignette,
            ruler=args.ruler,
            image_format=args.format,
        )
    except (SyntheticDataError, ManifestError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    manifest = Manifest.read(path)
    counts = ", ".join(f"{name} {n}" for name, n in manifest.class_counts().items())
    n_lesions = len({r["group"] for r in manifest.rows})
    print(f"wrote {len(manifest)} images of {n_lesions} lesions ({counts}) to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
