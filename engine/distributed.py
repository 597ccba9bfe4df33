"""Training on several processes with torch.distributed: torchrun (or SLURM) sets the environment, this module reads it.

``torchrun --nproc_per_node N segmentation/train.py ...`` starts N processes; each calls ``init_distributed`` (through
``engine.run.start_run``), which joins the process group with ``init_method=env://`` (NCCL on CUDA, gloo otherwise) and
gives the process its device (``cuda:LOCAL_RANK``). Under ``srun`` the SLURM variables are translated first.

What the loop does with it (engine/loop.py): ``train.batch_size`` stays the global batch; every rank draws the same
seeded epoch order from the stage's own loader (so weighted and hybrid sampling keep their meaning) and takes its share
of each global batch (``rank_loader``); DistributedDataParallel averages the gradients; the training loss and the
throughput are reduced over ranks; validation runs once, on rank 0, whose row every rank receives, so early stopping
and the best checkpoint are decided once; only rank 0 writes (checkpoints, config, logs, metrics, plots).
One process (no WORLD_SIZE, or WORLD_SIZE=1) runs exactly as before.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

logger = logging.getLogger(__name__)


def _slurm_to_torchrun() -> None:
    """Under ``srun`` (one task per process), set torchrun's variables from SLURM's when they are absent."""
    env = os.environ
    if "RANK" in env or "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) < 2:
        return
    env.setdefault("RANK", env["SLURM_PROCID"])
    env.setdefault("WORLD_SIZE", env["SLURM_NTASKS"])
    env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    env.setdefault("MASTER_PORT", "29500")
    if "MASTER_ADDR" not in env:  # the first host of the allocation, e.g. node[01-04] -> node01
        nodes = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))
        head = nodes.split(",")[0]
        if "[" in head:
            prefix, rest = head.split("[", 1)
            head = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
        env["MASTER_ADDR"] = head


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0, the one process that writes (always true in one process)."""
    return rank() == 0


def init_distributed(device: str) -> torch.device | None:
    """Join the process group when launched by torchrun or srun with more than one process; returns the device this
    rank uses (``None`` in one process: the caller picks as usual)."""
    _slurm_to_torchrun()
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and not device.startswith(("cpu", "mps"))
    chosen = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://")
        logger.info("rank %d of %d on %s (%s)", rank(), world_size(), chosen, dist.get_backend())
    if not is_main():  # one voice in the console: the other ranks say only what goes wrong
        logging.getLogger().setLevel(logging.WARNING)
    return chosen


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(*values: float) -> list[float]:
    """Each value summed over the ranks (as float64 on the CPU for gloo, or on the rank's GPU for NCCL)."""
    if world_size() == 1:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


class _RankBatches:
    """Batch sampler: this rank's share (strided) of each global batch of one epoch's order."""

    def __init__(self, order: list[int], batch_size: int, drop_last: bool, rank: int, world: int) -> None:
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if batches and (len(batches[-1]) < world or (drop_last and len(batches[-1]) < batch_size)):
            batches.pop()  # a last global batch too small to give every rank an image
        self.batches = [b[rank::world] for b in batches]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def rank_loader(loader: DataLoader) -> DataLoader:
    """``loader`` (one epoch's, seeded the same on every rank) as this rank's part: the same global batches, each
    split between the ranks. In one process ``loader`` itself."""
    world = world_size()
    if world == 1:
        return loader
    if loader.batch_size is None:
        raise ValueError("rank_loader needs a DataLoader built with batch_size (not a batch_sampler)")
    # the epoch's seeded order (shuffled, weighted or hybrid), drawn as iterating the loader in one process draws it:
    # the loader's base seed first, then the sampler's order
    torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
    order = [int(i) for i in loader.sampler]
    sampler = _RankBatches(order, loader.batch_size, loader.drop_last, rank(), world)
    return DataLoader(
        loader.dataset,
        batch_sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers if loader.num_workers else False,
    )
