"""The classification bar re-run on our split: a bare timm script, none of the stage's code in the loop.

``python benchmarks/classification_bare.py --manifest M --size 64 --epochs 8 --out DIR`` trains timm's resnet18 from
scratch on the manifest's ``train`` rows (whole images squashed to ``size``), with inverse-frequency class-weighted
cross-entropy, AdamW under torch's ``OneCycleLR`` and random flips, then scores the last epoch's model once on the
``test`` rows: balanced accuracy, accuracy, macro ROC AUC. It is the reference the stage's own runs are compared
against in BENCHMARKS.md, so the stage's gap to the bar is measured on the same images, not quoted.
"""

from __future__ import annotations

import numpy as np
import timm
import torch
from bare_loops import bare_arguments, fit, load_split, write_result
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from dermpipe.data.manifest import Manifest


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> np.ndarray:
    model.eval()
    return torch.cat([model(images[i : i + batch_size]).softmax(1) for i in range(0, len(images), batch_size)]).numpy()


def macro_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """One-vs-rest ROC AUC averaged over the classes that occur (and do not make up every row) in ``labels``."""
    present = [c for c in range(probs.shape[1]) if 0 < (labels == c).sum() < len(labels)]
    return float(np.mean([roc_auc_score(labels == c, probs[:, c]) for c in present]))


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = bare_arguments(argv, __doc__, model="resnet18", size=64, epochs=8, batch=64)
    manifest = Manifest.read(args.manifest)
    train, test = manifest.select("train", labelled=True), manifest.select("test", labelled=True)
    x_train, x_test = load_split(train, args.size), load_split(test, args.size)
    y_train, y_test = torch.tensor(train.label_indices()), np.array(test.label_indices())
    classes = manifest.classes

    counts = np.bincount(y_train.numpy(), minlength=len(classes))
    weights = torch.tensor(len(y_train) / (len(classes) * np.maximum(counts, 1)), dtype=torch.float32)
    model = timm.create_model(args.model, pretrained=False, num_classes=len(classes))
    seconds = fit(model, x_train, y_train, torch.nn.CrossEntropyLoss(weight=weights), args)

    probs = predict(model, x_test, 2 * args.batch_size)
    return write_result(
        args.out,
        "metrics_test.json",
        {
            "balanced_accuracy": float(balanced_accuracy_score(y_test, probs.argmax(1))),
            "accuracy": float(accuracy_score(y_test, probs.argmax(1))),
            "macro_auc": macro_auc(y_test, probs),
            "train_seconds": seconds,
        },
    )


if __name__ == "__main__":
    main()
