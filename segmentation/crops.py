"""A manifest's lesion crops written: crops.csv (what the classifiers train on), boxes.csv, skipped.csv, the crops and,
optionally, ISIC-style masks."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from dermpipe.data.manifest import Manifest, write_table
from dermpipe.data.quality import quality_text
from dermpipe.data.reading import write_image
from dermpipe.engine.files import output_stem, remove_stale_temporaries
from dermpipe.segmentation.prediction import SegmentationPredictor, SkipLog


def write_crops(
    manifest: Manifest,
    predictor: SegmentationPredictor,
    out_dir: str | os.PathLike,
    write_masks: bool = False,
    write_crop_files: bool = True,
    excluded: Sequence[Mapping[str, str]] = (),
) -> dict[str, int]:
    """Crop every manifest row; write ``crops.csv`` (a manifest with crop_path, crop_key, box, fallback),
    ``boxes.csv``, ``skipped.csv`` (with the folder listing's ``excluded`` files), crops as PNG and, optionally,
    ISIC-style masks (0/255 at image size)."""
    out = Path(out_dir)
    (out / "crops").mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # what a killed run left half-written
    if write_masks:
        (out / "masks").mkdir(exist_ok=True)
    by_id = {r["image_id"]: r for r in manifest.rows}
    rows, boxes, skipped = [], [], SkipLog(excluded)
    from tqdm import tqdm

    items = [(r["image_id"], r["image_path"]) for r in manifest.rows]
    for result in tqdm(skipped.passed(predictor.crop(items)), total=len(items), desc="crops", leave=False):
        crop_path = out / "crops" / f"{output_stem(result.image_id)}.png"  # named by id: found in one guess
        if write_crop_files:  # rewritten every run: an image changed under the same id never keeps a stale crop
            write_image(crop_path, result.crop)
        if write_masks:
            mask = result.full_mask(predictor.predict_cfg.threshold) * 255
            write_image(out / "masks" / f"{output_stem(result.image_id)}_segmentation.png", mask)
        box = result.box.as_text()
        rows.append(
            {
                **by_id[result.image_id],
                "crop_path": str(crop_path.resolve()),
                "crop_key": result.crop_key,
                "box": box,
                "fallback": result.box.fallback,
                "quality": quality_text(result.quality),
            }
        )
        boxes.append(
            {
                "image_id": result.image_id,
                "box": box,
                "mask_area": f"{result.box.mask_area:.6f}",
                "fallback": result.box.fallback,
                "quality": quality_text(result.quality),
            }
        )
    info = {**manifest.info, "crops": predictor.crop_settings()}  # the classifiers record what their crops were
    Manifest(rows=tuple(rows), classes=manifest.classes, info=info).write(out / "crops.csv")
    write_table(out / "boxes.csv", ["image_id", "box", "mask_area", "fallback", "quality"], boxes)
    skipped.write(out)
    predictor.cache.log_summary()
    return {
        "cropped": len(rows),
        "skipped": len(skipped),
        "fallback": sum(1 for b in boxes if b["fallback"]),
        "reused": predictor.cache.reused,
        "computed": predictor.cache.computed,
        "corrupt": predictor.cache.corrupt,
    }
