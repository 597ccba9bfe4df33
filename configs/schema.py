"""Config sections shared by every stage (the stage configs themselves live beside their stage's code)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunConfig:
    """Where a run writes, how it is seeded, and on what it runs."""

    out_dir: str = "runs/segmentation"
    cache_dir: str = "runs/cache"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    amp: bool = True  # only on CUDA
    channels_last: bool = True  # only on CUDA
    num_workers: int = 0
    threads: int = 0  # torch CPU threads; 0 = torch's default
    force: bool = False  # recompute cached stage outputs
