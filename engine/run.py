"""Run setup shared by every stage script: seeds, device choice, logging to console and run folder, saved config."""

from __future__ import annotations

import logging
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from dermpipe.configs.loader import config_hash, to_dict
from dermpipe.engine.distributed import init_distributed, is_main
from dermpipe.engine.files import remove_stale_temporaries, write_text_atomic
from dermpipe.errors import DermpipeError

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class DeviceError(DermpipeError):
    """A ``--device`` that is not a device name, or not available on this machine."""


def save_config(config: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically) so the run can be repeated from it."""
    return write_text_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))  # noqa: NPY002 - libraries that still draw from the legacy global state
    torch.manual_seed(seed)


def choose_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit name that is not available fails clearly."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: no CUDA GPU is visible here; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError("--device mps: Apple MPS is not available here; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise DeviceError(f"--device {name}: not a device name; use auto, cpu, cuda, cuda:N or mps") from None


def setup_logging(run_dir: Path | None = None, level: int = logging.INFO) -> None:
    """Console handler plus ``<run_dir>/train.log``; replaces handlers a previous call added."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_dermpipe", False):
            root.removeHandler(h)
            h.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    for h in handlers:
        h.setFormatter(logging.Formatter(LOG_FORMAT, "%H:%M:%S"))
        h._dermpipe = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(level)


# What each stage leaves in its run folder, to tell one stage's run from another's.
STAGE_FILES = {"segmentation": "best.safetensors", "classification": "best.safetensors", "ensemble": "meta.safetensors"}


class RunFolderError(DermpipeError):
    """A run folder that belongs to another stage."""


def folder_stage(path: Path) -> str | None:
    """The stage whose run a folder holds, read from its checkpoints' metadata (``None``: no finished checkpoint)."""
    from dermpipe.engine.checkpoint import CheckpointError, read_metadata

    for name in ("best.safetensors", "last.safetensors", "meta.safetensors"):
        if (path / name).is_file():
            try:
                return str(read_metadata(path / name).get("stage") or "") or None
            except CheckpointError:
                continue
    return None


def check_run_folder(path: Path, stage: str) -> None:
    """Refuse a folder that holds another stage's run (its files would be mixed with, or taken for, this stage's)."""
    found = folder_stage(path)
    if found is not None and found != stage:
        raise RunFolderError(f"{path} is a {found} run, not a {stage} run: pass the {stage} run's folder")
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"{path} is a file, not a run folder: pass a folder (it is created when missing)")


@dataclass(frozen=True)
class Run:
    """What a stage needs from its setup: where to write, on which device, with AMP and channels_last or not.

    Nothing is written until ``begin``: a command refused while it validates leaves the folder as it was.
    """

    dir: Path
    device: torch.device
    amp: bool
    channels_last: bool
    config_hash: str
    amp_dtype: torch.dtype = torch.bfloat16
    compile: bool = False
    config: Any = field(default=None, repr=False, compare=False)

    def begin(self) -> None:
        """The run starts for real (everything validated): create the folder, log there, write config.yaml once.
        Under torchrun only rank 0 writes."""
        if not is_main():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.dir, recursive=False)  # what a killed run left half-written
        setup_logging(self.dir)
        if self.config is not None:
            save_config(self.config, self.dir / "config.yaml")

    def autocast(self) -> Any:
        """bf16/fp16 autocast on CUDA when AMP is on; a no-op context elsewhere."""
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.amp)

    @property
    def scaled(self) -> bool:
        """A gradient scaler is needed: float16 autocast (bfloat16 has float32's range)."""
        return self.amp and self.amp_dtype == torch.float16

    def batch(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch moved to the run's device, images channels-last when that is on."""
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets.to(self.device, non_blocking=True)


def start_run(
    run_dir: str | os.PathLike,
    config: Any,
    seed: int,
    device: str = "auto",
    amp: bool = True,
    channels_last: bool = True,
    threads: int = 0,
    stage: str | None = None,
    amp_dtype: str = "bfloat16",
    compile: bool = False,
) -> Run:
    """Seed, pick the device, and refuse a folder of another ``stage``; writes nothing (see ``Run.begin``).

    AMP and channels_last only help on a GPU, so they are switched off elsewhere whatever the config says.
    """
    path = Path(run_dir)
    if stage is not None:
        check_run_folder(path, stage)
    setup_logging(None)
    ranked = init_distributed(device)  # under torchrun or srun: join the process group, this rank's device
    seed_everything(seed)
    if threads > 0:
        torch.set_num_threads(threads)
    dev = ranked if ranked is not None else choose_device(device)
    on_gpu = dev.type == "cuda"
    run = Run(
        dir=path,
        device=dev,
        amp=amp and on_gpu,
        channels_last=channels_last and on_gpu,
        config_hash=config_hash(config),
        config=config,
        amp_dtype=getattr(torch, amp_dtype),
        compile=compile and on_gpu,
    )
    logger.info("run %s on %s (amp=%s, channels_last=%s)", path, dev, run.amp, run.channels_last)
    return run


def start_stage_run(cfg: Any, stage: str, run_dir: str | os.PathLike | None = None) -> Run:
    """``start_run`` with a stage config's ``run`` section (seed, device, AMP, channels_last, threads)."""
    r = cfg.run
    return start_run(run_dir or r.out_dir, cfg, r.seed, r.device, r.amp, r.channels_last, r.threads, stage=stage,
                     amp_dtype=r.amp_dtype, compile=r.compile)  # fmt: skip
