"""Which part of a sharded prediction this process predicts: from the flags, torchrun's environment or a SLURM array."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dermpipe.predict.shards import ShardError, part_range, shard_folder


@dataclass(frozen=True)
class Shard:
    """Part ``index`` of ``count``; ``source`` says where the numbers came from (flags, torchrun or slurm)."""

    index: int
    count: int
    source: str = "flags"

    @property
    def name(self) -> str:
        return f"shard {self.index} of {self.count}"

    def folder(self, out: str | os.PathLike) -> Path:
        return shard_folder(out, self.index, self.count)

    def part(self, total: int) -> tuple[int, int]:
        """``[start, stop)`` of this shard's part of ``total`` inputs."""
        return part_range(total, self.index, self.count)


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ShardError(f"environment variable {name}={value!r} is not a whole number") from None


def resolve_shard(
    num_shards: int | None, shard_index: int | None, environ: Mapping[str, str] | None = None
) -> Shard | None:
    """This process's shard: ``--num-shards``/``--shard-index`` when given (each flag wins over the environment),
    else torchrun's ``WORLD_SIZE``/``RANK``, else a SLURM array's ``SLURM_ARRAY_TASK_COUNT``/``SLURM_ARRAY_TASK_ID``
    (less ``SLURM_ARRAY_TASK_MIN``); torchrun inside each task of a SLURM array: ``WORLD_SIZE`` parts per task.

    ``None``: one process over the whole list (no flags and no environment of several processes, or one shard).
    """
    env = os.environ if environ is None else environ
    env_count = env_index = None
    source = where = ""
    if env.get("SLURM_ARRAY_TASK_COUNT") and env.get("SLURM_ARRAY_TASK_ID"):
        env_count = _env_int(env, "SLURM_ARRAY_TASK_COUNT") or 1
        task = _env_int(env, "SLURM_ARRAY_TASK_ID") or 0
        env_index = task - (_env_int(env, "SLURM_ARRAY_TASK_MIN") or 0)
        if not 0 <= env_index < env_count and shard_index is None:
            raise ShardError(
                f"SLURM array task {task} is not one of {env_count} tasks numbered from SLURM_ARRAY_TASK_MIN: submit "
                f"the array as --array=0-{env_count - 1} (no step), or pass --num-shards and --shard-index"
            )
        source, where = "slurm", "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT"
    if env.get("WORLD_SIZE") and env.get("RANK"):
        size, rank = _env_int(env, "WORLD_SIZE") or 1, _env_int(env, "RANK") or 0
        if source == "slurm":  # torchrun in every task of an array: the task's part split over its ranks
            env_count, env_index = (env_count or 1) * size, (env_index or 0) * size + rank
            source, where = "slurm+torchrun", "the SLURM array task and RANK/WORLD_SIZE"
        else:
            env_count, env_index, source, where = size, rank, "torchrun", "RANK/WORLD_SIZE"
    if num_shards is None and shard_index is None:
        count, index = env_count, env_index
    else:
        count = num_shards if num_shards is not None else env_count
        index = shard_index if shard_index is not None else env_index
        if count is None:
            raise ShardError(f"--shard-index {shard_index} needs --num-shards N (how many parts the list is split in)")
        if index is None and count > 1:
            raise ShardError(f"--num-shards {count} needs --shard-index I (which part this process predicts, 0 to "
                             f"{count - 1})")  # fmt: skip
        if num_shards is not None and shard_index is not None:
            source, where = "flags", ""
    if count is None or (count == 1 and shard_index in (None, 0)):  # one shard: the environment's index is moot
        return None  # one process over the whole list
    if count < 1:
        raise ShardError(f"the number of shards must be at least 1, got {count}")
    assert index is not None
    if not 0 <= index < count:
        what = f"{where} give shard index {index}" if where else f"--shard-index {index}"
        raise ShardError(f"{what}, which is not one of 0 to {count - 1}: the {count} parts are numbered from 0")
    return Shard(index, count, source or "flags")


def local_device(name: str, environ: Mapping[str, str] | None = None) -> str:
    """Under torchrun, the device of this rank: ``cuda:LOCAL_RANK`` for ``auto`` or ``cuda`` when CUDA is there;
    any other device name (``cpu``, ``cuda:N``, ``mps``) as given."""
    env = os.environ if environ is None else environ
    local = _env_int(env, "LOCAL_RANK")
    name = (name or "auto").lower()
    if local is None or name not in ("auto", "cuda"):
        return name
    import torch

    if name == "cuda" or torch.cuda.is_available():
        return f"cuda:{local}"
    return name
