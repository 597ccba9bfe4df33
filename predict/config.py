"""Batch prediction's config: the trained stages' run folders, the engine, the outputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from dermpipe.configs.schema import RunConfig


@dataclass(frozen=True)
class PredictOutputs:
    masks: bool = False  # ISIC_xxx_segmentation.png per image (0/255, image size)
    crops: bool = False  # the square lesion crops as PNG
    gradcam: bool = False  # Grad-CAM overlays of the first backbone, per image
    report: bool = True  # report.html with thumbnails, contours, crops, Grad-CAM and probability bars
    report_max_images: int = 2000  # images shown in the report (all are in predictions.csv)
    isic_csv: bool = False  # ISIC challenge submission CSV (image, CLASS columns)


@dataclass(frozen=True)
class PredictConfig:
    """Batch prediction over a folder: the trained stages' run folders in, one row per image out."""

    segmentation_run: str = ""  # '' = <root>/segmentation
    classification_root: str = ""  # '' = <root>/classification
    ensemble_run: str = ""  # '' = <root>/ensemble
    batch_size: int = 32  # images per forward pass (and per streamed chunk)
    tta: bool = False  # classifier flip/rotation TTA (the segmentation TTA comes from its run's config)
    refer: bool = True  # apply the ensemble run's refer threshold
    # what runs the networks' forward passes: PyTorch, or ONNX Runtime on the .onnx files `dermpipe export` writes
    engine: Literal["pytorch", "onnxruntime", "onnxruntime-int8"] = "pytorch"
    outputs: PredictOutputs = field(default_factory=PredictOutputs)
    run: RunConfig = field(default_factory=RunConfig)

    ROOT_PATHS: ClassVar[dict[str, str]] = {
        "segmentation_run": "segmentation",
        "classification_root": "classification",
        "ensemble_run": "ensemble",
        "run.out_dir": "predict",
        "run.cache_dir": "cache",
    }
