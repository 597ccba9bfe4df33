"""Config sections shared by every stage (the stage configs themselves live beside their stage's code)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Where each stage reads and writes under one run root (``--root``, default ``runs``). A path setting left empty
# ('') in a stage config takes its place here; one set to a path keeps it (the cache can be shared between roots).
ROOT_LAYOUT = {
    "segmentation": "segmentation",  # the U-Net run
    "crops": "crops",  # segmentation/predict.py: crops.csv, boxes.csv, crops/
    "classification": "classification",  # one run folder per backbone
    "ensemble": "ensemble",  # the vote
    "predict": "predict",  # batch prediction's skipped.csv, report.html and optional outputs
    "cache": "cache",  # every stage's content-addressed cache
}
DEFAULT_ROOT = "runs"


@dataclass(frozen=True)
class RunConfig:
    """Where a run writes, how it is seeded, and on what it runs."""

    root: str = DEFAULT_ROOT  # the run root every stage reads and writes under (--root)
    out_dir: str = ""  # '' = the stage's folder under root
    cache_dir: str = ""  # '' = <root>/cache
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    amp: bool = True  # mixed precision, only on CUDA
    amp_dtype: Literal["bfloat16", "float16"] = "bfloat16"  # float16 adds a gradient scaler; bfloat16 needs none
    channels_last: bool = True  # only on CUDA
    compile: bool = False  # torch.compile the model for training (CUDA; slow to start, faster per step)
    num_workers: int = 0
    prefetch: int = 1  # prediction: batches of images read, decoded and preprocessed ahead by a thread (0: none)
    threads: int = 0  # torch CPU threads; 0 = torch's default
    force: bool = False  # recompute cached stage outputs
