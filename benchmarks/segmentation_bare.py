"""The segmentation bar re-run on our split: a bare segmentation-models-pytorch script, none of the stage's code.

``python benchmarks/segmentation_bare.py --manifest M --size 128 --epochs 4 --out DIR`` trains smp's U-Net with a
ResNet-18 encoder (``--model``) from scratch on the manifest's ``train`` rows (images and masks squashed to ``size``),
Dice + BCE, AdamW under torch's ``OneCycleLR``, random flips; then the last epoch's model predicts each ``test`` image
once (no TTA, no post-processing), the probability is resized to the stored mask's size and thresholded at 0.5, and
the masks are scored per image as the ISIC challenge does (mean Jaccard and thresholded Jaccard). BENCHMARKS.md
compares the stage's runs with this on the same images.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import segmentation_models_pytorch as smp
import torch
from bare_loops import bare_arguments, fit, load_split, write_result

from dermpipe.data.manifest import Manifest
from dermpipe.segmentation.metrics import image_scores, mean_scores, read_mask


def load_masks(manifest: Manifest, size: int) -> torch.Tensor:
    """Every mask of ``manifest`` resized (nearest) to ``size`` x ``size``, as an N1HW float tensor of 0/1."""
    out = np.empty((len(manifest), 1, size, size), dtype=np.float32)
    for i, row in enumerate(manifest.rows):
        out[i, 0] = cv2.resize(read_mask(Path(row["mask_path"])), (size, size), interpolation=cv2.INTER_NEAREST) > 0
    return torch.from_numpy(out)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = bare_arguments(argv, __doc__, model="resnet18", size=128, epochs=4, batch=8)
    manifest = Manifest.read(args.manifest)
    train, test = manifest.select("train"), manifest.select("test")
    model = smp.Unet(args.model, encoder_weights=None, classes=1)
    dice, bce = smp.losses.DiceLoss("binary", from_logits=True), torch.nn.BCEWithLogitsLoss()
    x, y = load_split(train, args.size), load_masks(train, args.size)
    seconds = fit(model, x, y, lambda logits, masks: dice(logits, masks) + bce(logits, masks), args, flip_targets=True)

    model.eval()
    x_test, scores = load_split(test, args.size), []
    with torch.no_grad():
        for i in range(0, len(test), 2 * args.batch_size):
            probs = model(x_test[i : i + 2 * args.batch_size]).sigmoid()[:, 0].numpy()
            for prob, row in zip(probs, test.rows[i : i + 2 * args.batch_size]):
                truth = read_mask(Path(row["mask_path"]))
                full = cv2.resize(prob, (truth.shape[1], truth.shape[0]), interpolation=cv2.INTER_LINEAR)
                scores.append(image_scores(full > 0.5, truth))
    return write_result(
        args.out, "scores_test.json", {**mean_scores(scores), "images": len(scores), "train_seconds": seconds}
    )


if __name__ == "__main__":
    main()
