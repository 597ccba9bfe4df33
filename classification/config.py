"""The classification stage's config: data (crops, size, preprocessing, augmentation, balance), model, training, run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from dermpipe.configs.schema import RunConfig
from dermpipe.data.augment_config import AugmentConfig
from dermpipe.data.balance import BalanceConfig
from dermpipe.data.preprocess import PreprocessConfig


@dataclass(frozen=True)
class ClsDataConfig:
    manifest: str = ""  # the crops manifest written by segmentation/predict.py; '' = <root>/crops/crops.csv
    crops: bool = True  # false: train on whole images (image_path) instead of the lesion crops (crop_path)
    image_size: int = 0  # square input side; 0 = the backbone's native size (224, or 299 for the Inception family)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)


@dataclass(frozen=True)
class ClsModelConfig:
    backbone: str = "resnet50"  # resnet50 | densenet169 | inception_v3 | inception_resnet_v2 | xception | any timm name
    pretrained: bool | str = True  # true: timm's ImageNet weights (downloaded once); false; or a local weights file
    drop_rate: float = 0.3  # dropout before the linear head
    se_reduction: int = 16  # SE block bottleneck ratio r (Hu et al. 2018); 0 = no SE block (ablation)

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"model.drop_rate must be in [0, 1), got {self.drop_rate}")
        if self.se_reduction < 0:
            raise ValueError(f"model.se_reduction must be >= 1, or 0 for no SE block; got {self.se_reduction}")


@dataclass(frozen=True)
class ClsTrainConfig:
    epochs: int = 30
    batch_size: int = 32
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1.0e-3  # peak learning rate while only the head learns (and without freezing)
    momentum: float = 0.9  # SGD only
    weight_decay: float = 1.0e-2
    warmup_epochs: float = 1.0
    schedule: Literal["cosine", "onecycle"] = "cosine"
    label_smoothing: float = 0.0
    loss: Literal["ce", "focal"] = "ce"  # focal: Lin et al. 2017
    focal_gamma: float = 2.0
    # train only the SE block and head for this many epochs, then unfreeze the backbone; None = auto: 1 with
    # pretrained weights (true or a local file), 0 from scratch (effective_freeze_epochs below)
    freeze_epochs: int | None = None
    unfreeze_lr_scale: float = 0.1  # once unfrozen, the whole network learns at lr x this (fine-tuning)
    # the backbone's BatchNorm statistics while the whole network learns: "frozen" keeps the running statistics it
    # started with (its BatchNorm layers stay in eval mode; their scale and shift still learn), "batch" normalises by
    # each training batch and moves the running statistics slowly (PyTorch's default), "reestimate" is "batch" with the
    # statistics recomputed on training batches before each evaluation; auto = frozen with pretrained weights, batch
    # from scratch (BENCHMARKS.md, "Fine-tuning ImageNet weights", chose it on the validation split)
    batchnorm: Literal["auto", "frozen", "batch", "reestimate"] = "auto"
    bn_momentum: float = 0.0  # > 0: every backbone BatchNorm layer's momentum (timm's carry 0.1); 0 = theirs
    bn_reestimate_batches: int = 20  # batchnorm reestimate: training batches the statistics are recomputed on
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    patience: int = 8  # early stopping on validation balanced accuracy; 0 = off
    max_steps_per_epoch: int = 0  # 0 = whole epoch
    eval_batch_size: int = 0  # 0 = 2 x batch_size
    tta: bool = False  # average the probabilities over the 8 flips/rotations of each crop
    folds: int = 0  # K >= 2: K-fold training on the train split, with out-of-fold probabilities
    fold: int = -1  # with folds: train only this fold (0..K-1); -1 = every fold in turn
    # with folds, the model of the val and test tables and of prediction: "mean" (the mean probability of the K fold
    # models, the models the out-of-fold vote learned from) or "refit" (one more model trained on the whole training
    # split and stopped on val)
    fold_models: Literal["mean", "refit"] = "mean"
    gradcam_images: int = 4  # Grad-CAM overlays of the first validation images; 0 = none
    # the out-of-distribution check fitted after training (classification/ood.py): its threshold is this percentile
    # of the validation crops' feature distances; 0 = no check
    ood_percentile: float = 99.5

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("train.epochs and train.batch_size must be at least 1")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.folds == 1 or self.folds < 0:
            raise ValueError(f"train.folds must be 0 (off) or at least 2, got {self.folds}")
        if not self.folds and self.fold != -1:
            raise ValueError(f"train.fold {self.fold} needs train.folds (--folds K) as well")
        if self.folds and not -1 <= self.fold < self.folds:
            raise ValueError(f"train.fold must be -1 (all) or 0..{self.folds - 1}, got {self.fold}")
        if not 0.0 <= self.ood_percentile < 100.0:
            raise ValueError(f"train.ood_percentile must be in [0, 100) (0 = no check), got {self.ood_percentile}")
        if self.freeze_epochs is not None and not 0 <= self.freeze_epochs <= self.epochs:
            raise ValueError(
                f"train.freeze_epochs must be in 0..train.epochs ({self.epochs}), or null (auto); "
                f"got {self.freeze_epochs}"
            )


@dataclass(frozen=True)
class ClassificationConfig:
    data: ClsDataConfig = field(default_factory=ClsDataConfig)
    model: ClsModelConfig = field(default_factory=ClsModelConfig)
    train: ClsTrainConfig = field(default_factory=ClsTrainConfig)
    run: RunConfig = field(default_factory=RunConfig)  # out_dir holds one run folder per backbone

    ROOT_PATHS: ClassVar[dict[str, str]] = {
        "data.manifest": "crops/crops.csv",
        "run.out_dir": "classification",
        "run.cache_dir": "cache",
    }


def effective_batchnorm(cfg: ClassificationConfig) -> str:
    """``train.batchnorm`` with auto resolved: frozen statistics on pretrained weights (the ImageNet statistics fit the
    features the new head learned in its head-only epochs; batch statistics at the unfreeze shift them), batch
    statistics from scratch (random weights have no statistics worth keeping)."""
    if cfg.train.batchnorm != "auto":
        return cfg.train.batchnorm
    return "frozen" if cfg.model.pretrained else "batch"


def effective_freeze_epochs(cfg: ClassificationConfig) -> int:
    """The head-only epochs: ``train.freeze_epochs`` when given, else (null, auto) 1 on pretrained weights (timm's
    download or a local file: the new head first learns on features worth keeping) and 0 from scratch (nothing to
    protect, and a head fitted to random features only delays training)."""
    if cfg.train.freeze_epochs is not None:
        return cfg.train.freeze_epochs
    return 1 if cfg.model.pretrained else 0
