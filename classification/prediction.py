"""Class probabilities of a trained backbone: batched, optionally over the 8 flips and quarter turns (TTA), and cached
per crop, so batch prediction and the training run's probability tables share one cache entry per crop and model."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dermpipe.classification.backbones import LesionClassifier
from dermpipe.data.loaders import model_input, to_device
from dermpipe.data.preprocess import PreprocessConfig
from dermpipe.engine.cache import StageCache, stage_key
from dermpipe.engine.onnx_runtime import OnnxModule

logger = logging.getLogger(__name__)

STAGE = "crop_probabilities"


def dihedral_views(images: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/rotations of a B x C x H x W batch (a lesion has no "up", so all 8 are equally valid views)."""
    views = []
    for flipped in (images, images.flip(-1)):
        views.extend(torch.rot90(flipped, k, dims=(-2, -1)) for k in range(4))
    return views


def classifier_input(
    model: LesionClassifier, images: Sequence[np.ndarray], preprocess_cfg: PreprocessConfig | None = None
) -> torch.Tensor:
    """Normalised input (B x 3 x S x S) for uint8 RGB images of any size, as ``model`` was trained."""
    cfg = model.data_config
    return model_input(images, model.input_size, cfg["mean"], cfg["std"], preprocess_cfg)


def logits_and_features(model: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, pooled features) of one forward pass: a classifier's own ``forward_with_features``, or an ONNX
    Runtime session's two outputs (``None`` for the features of an export made before it had them)."""
    if isinstance(model, OnnxModule):
        outputs = model.outputs(x)
        return outputs[0], outputs[1] if len(outputs) > 1 else None
    return model.forward_with_features(x)


def predict_probabilities(model: LesionClassifier, images: Sequence[np.ndarray], **options: Any) -> np.ndarray:
    """Softmax probabilities (N x C float32, rows sum to 1) of uint8 RGB images, in their order.

    Images are preprocessed (``preprocess_cfg``, as in training), resized and normalised here; ``tta`` averages the
    probabilities of the 8 flips/rotations of each image. ``options``: those of ``predict_with_features``.
    """
    return predict_with_features(model, images, **options, features=False)[0]


@torch.inference_mode()
def predict_with_features(
    model: LesionClassifier,
    images: Sequence[np.ndarray],
    tta: bool = False,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    amp: bool = False,
    channels_last: bool = False,
    preprocess_cfg: PreprocessConfig | None = None,
    desc: str = "predict",
    features: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Softmax probabilities (N x C float32, rows sum to 1) of uint8 RGB images, in their order, and, from the same
    forward passes when ``features``, their pooled features (N x D float32, averaged over the TTA views like the
    probabilities; ``None`` when not asked for or when the network does not give them: an older ONNX export).

    Images are preprocessed (``preprocess_cfg``, as in training), resized and normalised here; ``tta`` averages over
    the 8 flips/rotations of each image.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    chunks, pooled_chunks = [], []
    with tqdm(total=len(images), desc=desc, leave=False, disable=None) as bar:
        for start in range(0, len(images), batch_size):
            batch = classifier_input(model, images[start : start + batch_size], preprocess_cfg)
            batch = to_device(batch, device)
            if channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            views = dihedral_views(batch) if tta else [batch]
            probs = torch.zeros(batch.shape[0], model.num_classes, device=device)
            pooled: torch.Tensor | None = None
            for view in views:
                with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                    if features:
                        logits, feats = logits_and_features(model, view)
                        if feats is not None:
                            pooled = feats.float() if pooled is None else pooled + feats.float()
                    else:
                        logits = model(view)
                probs += torch.softmax(logits.float(), dim=1)
            chunks.append((probs / len(views)).cpu().numpy())
            if pooled is not None:
                pooled_chunks.append((pooled / len(views)).cpu().numpy())
            bar.update(batch.shape[0])
    if not chunks:
        return np.zeros((0, model.num_classes), dtype=np.float32), None
    all_pooled = np.concatenate(pooled_chunks).astype(np.float32) if len(pooled_chunks) == len(chunks) else None
    return np.concatenate(chunks).astype(np.float32), all_pooled


def prediction_settings(model: LesionClassifier, tta: bool, preprocess_cfg: PreprocessConfig | None) -> dict[str, Any]:
    """The settings besides the weights that change a crop's probabilities: size, normalisation, TTA, preprocessing."""
    return {
        "backbone": model.backbone_name,
        "input_size": int(model.input_size),
        "mean": [float(m) for m in model.data_config["mean"]],
        "std": [float(s) for s in model.data_config["std"]],
        "tta": bool(tta),
        "preprocess": asdict(preprocess_cfg or PreprocessConfig()),
    }


class CropProbabilities:
    """One trained backbone's probabilities per crop, each cached under (crop key, checkpoint digest, settings).

    ``crop key`` is the content key of the input: the segmentation stage's crop key, or a whole image's file digest.
    """

    def __init__(
        self,
        model: LesionClassifier,
        weights_digest: str,
        cache: StageCache,
        *,
        tta: bool = False,
        preprocess_cfg: PreprocessConfig | None = None,
        batch_size: int = 64,
        device: torch.device | str | None = None,
        amp: bool = False,
        channels_last: bool = False,
        features: bool = False,
    ) -> None:
        """``features``: keep each crop's pooled features too (in its cache entry, beside the probabilities), for
        the out-of-distribution check; an entry cached without them is then computed again."""
        self.model, self.weights_digest, self.cache = model, weights_digest, cache
        self.tta, self.preprocess_cfg, self.batch_size = tta, preprocess_cfg, batch_size
        self.device, self.amp, self.channels_last = device, amp, channels_last
        self.features = features
        self.settings = prediction_settings(model, tta, preprocess_cfg)

    def key(self, crop_key: str) -> str:
        return stage_key(STAGE, upstream=[crop_key], model=self.weights_digest, settings=self.settings)

    def __call__(
        self,
        crop_keys: Sequence[str],
        image: Callable[[int], np.ndarray],
        preprocessed: bool = False,
        desc: str = "predict",
    ) -> np.ndarray:
        """Probabilities (N x C) of the crops ``crop_keys``; ``image(i)`` gives crop ``i``'s pixels for a cache miss
        (already preprocessed when ``preprocessed``, e.g. from the training run's resized-image cache)."""
        return self.scored(crop_keys, image, preprocessed, desc)[0]

    def scored(
        self,
        crop_keys: Sequence[str],
        image: Callable[[int], np.ndarray],
        preprocessed: bool = False,
        desc: str = "predict",
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities N x C, pooled features N x D or ``None``) of the crops ``crop_keys``, as ``__call__``; the
        features when ``self.features`` is on and the network gives them (an ONNX export made before it had them
        gives ``None``)."""
        keys = [self.key(k) for k in crop_keys]
        out: list[np.ndarray | None] = []
        pooled: list[np.ndarray | None] = []
        for key in keys:
            hit = self.cache.get(key)
            if hit is not None and self.features and "features" not in hit[0]:
                hit = None  # cached before the features were kept: computed again, with them
            out.append(hit[0]["probs"] if hit is not None else None)
            pooled.append(hit[0].get("features") if hit is not None else None)
        # A batch that holds a miss is computed whole, as a run that found nothing cached computes it: a forward
        # pass's last bits depend on the batch's size and on a crop's place in it (the kernels' order of summation),
        # so computing the misses alone would give a recomputed entry other bits than the first computation's.
        batches = [range(s, min(s + self.batch_size, len(keys))) for s in range(0, len(keys), self.batch_size)]
        for chunk in (list(b) for b in batches if any(out[i] is None for i in b)):
            probs, feats = predict_with_features(
                self.model,
                [image(i) for i in chunk],
                tta=self.tta,
                batch_size=self.batch_size,
                device=self.device,
                amp=self.amp,
                channels_last=self.channels_last,
                preprocess_cfg=None if preprocessed else self.preprocess_cfg,
                desc=desc,
                features=self.features,
            )
            for j, (i, p) in enumerate(zip(chunk, probs)):
                if out[i] is not None:  # a hit computed again beside the misses: its entry stays as it is
                    continue
                arrays = {"probs": p} if feats is None else {"probs": p, "features": feats[j]}
                self.cache.put(keys[i], arrays)
                out[i], pooled[i] = p, None if feats is None else feats[j]
        if not out:
            return np.zeros((0, self.model.num_classes), dtype=np.float32), None
        probs_out = np.stack(out).astype(np.float32)  # type: ignore[arg-type]
        if not self.features or any(f is None for f in pooled):
            return probs_out, None
        return probs_out, np.stack(pooled).astype(np.float32)  # type: ignore[arg-type]
