"""The segmentation stage's config: data, U-Net model, training and lesion-crop prediction sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from dermpipe.configs.schema import RunConfig
from dermpipe.data.augment_config import AugmentConfig
from dermpipe.data.preprocess import PreprocessConfig


@dataclass(frozen=True)
class SegDataConfig:
    manifest: str = ""
    image_size: int = 256  # the U-Net's square input
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class SegModelConfig:
    architecture: str = "Unet"  # any smp architecture name
    encoder: str = "resnet34"  # any smp encoder, or tu-<timm name>
    encoder_weights: str | None = "imagenet"  # imagenet (downloads when online), a local file, or null
    decoder_attention: str | None = None  # e.g. scse
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)  # U-Net decoder widths, one per encoder stage


@dataclass(frozen=True)
class SegTrainConfig:
    epochs: int = 40
    batch_size: int = 16
    lr: float = 1.0e-3
    weight_decay: float = 1.0e-4
    schedule: Literal["onecycle", "cosine"] = "onecycle"  # one meaning for both stages: engine/schedules.py
    warmup_epochs: float = 1.0
    dice_weight: float = 1.0
    bce_weight: float = 1.0
    dice_per_image: bool = True  # one soft Dice per image, averaged (as ISIC scores); false: Dice over the batch
    lovasz_weight: float = 0.0  # > 0: add smp's Lovasz hinge, per image (a surrogate of the per-image Jaccard)
    patience: int = 10  # early stopping on validation Jaccard
    grad_clip: float = 0.0
    ema_decay: float = 0.0  # > 0: validate and keep as best an exponential moving average of the weights (timm)
    max_steps_per_epoch: int = 0  # 0 = whole epoch
    panel_images: int = 8


@dataclass(frozen=True)
class SegPredictConfig:
    threshold: float = 0.5
    tta: bool = True  # horizontal and vertical flips
    tta_rotations: bool = False  # with tta: all 8 flips and quarter turns (3 views without)
    margin: float = 0.1  # box margin, fraction of the box side
    crop_size: int = 299  # square crops for the classifiers
    min_area: float = 0.005  # a lesion smaller than this fraction of the image falls back to the whole image
    batch_size: int = 16
    write_masks: bool = False  # ISIC_xxx_segmentation.png at image size
    write_crops: bool = True


@dataclass(frozen=True)
class SegmentationConfig:
    data: SegDataConfig = field(default_factory=SegDataConfig)
    model: SegModelConfig = field(default_factory=SegModelConfig)
    train: SegTrainConfig = field(default_factory=SegTrainConfig)
    predict: SegPredictConfig = field(default_factory=SegPredictConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # empty path settings -> their place under run.root (configs.loader.place_under_root)
    ROOT_PATHS: ClassVar[dict[str, str]] = {"run.out_dir": "segmentation", "run.cache_dir": "cache"}
