"""Synthetic dermoscopy images with exact lesion masks, class-dependent lesions and lesion groups, for offline tests."""

from dermpipe.data.generator.painter import make_lesion_views, make_sample
from dermpipe.data.generator.profiles import DEFAULT_CLASSES, LesionProfile, SyntheticDataError, class_profile
from dermpipe.data.generator.writer import IMAGE_FORMATS, class_counts, generate_dataset

__all__ = [
    "DEFAULT_CLASSES",
    "IMAGE_FORMATS",
    "LesionProfile",
    "SyntheticDataError",
    "class_counts",
    "class_profile",
    "generate_dataset",
    "make_lesion_views",
    "make_sample",
]
