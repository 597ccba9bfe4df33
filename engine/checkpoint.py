"""Safe checkpoints: ``safetensors`` weights plus string metadata that rebuilds the model; resume state apart.

A user's file is never unpickled: weights load through safetensors, and resume state through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from dermpipe.engine.cache import library_versions
from dermpipe.engine.files import atomic_path, file_digest
from dermpipe.errors import DermpipeError, plain_message

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1"


class CheckpointError(DermpipeError):
    """A checkpoint that is missing, unreadable, or made for another stage, backbone or class set."""


def _encode(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _decode(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, metadata: Mapping[str, Any]) -> Path:
    """Write ``model``'s weights and ``metadata`` (values JSON-encoded to strings) atomically.

    ``metadata`` should hold what rebuilds the model: ``stage``, ``architecture`` (or ``backbone``), ``classes`` in
    order, ``input_size``, ``mean``, ``std``, ``config_hash``; library versions are added here.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {k: _encode(v) for k, v in metadata.items()}
    meta.setdefault("versions", json.dumps(library_versions()))
    meta["format_version"] = FORMAT_VERSION
    # safetensors refuses tensors that share memory (tied weights); clone those
    seen: dict[int, str] = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        if ptr in seen and ptr != -1:
            state[k] = v.clone()
        seen[ptr] = k
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded metadata of a checkpoint, without loading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: train the stage first or pass the right run folder")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {path} is not a readable safetensors file ({plain_message(e)}); re-export or retrain it"
        ) from None
    return {k: _decode(v) for k, v in raw.items()}


def check_metadata(path: str | os.PathLike, meta: Mapping[str, Any], expect: Mapping[str, Any]) -> None:
    for key, want in expect.items():
        have = meta.get(key)
        if isinstance(want, tuple):
            want = list(want)
        if have != want:
            raise CheckpointError(
                f"checkpoint {path} was made for {key}={have!r}, not {want!r}: pass a checkpoint of this "
                f"{meta.get('stage', 'stage') if key != 'stage' else 'stage'} or retrain"
            )


def check_trained_setting(path: str | os.PathLike, key: str, trained: Any, given: Any) -> None:
    """Refuse a config whose ``key`` disagrees with what the checkpoint at ``path`` was trained with."""
    if isinstance(given, tuple):
        given = list(given)
    if isinstance(trained, tuple):
        trained = list(trained)
    if trained != given:
        raise CheckpointError(
            f"{path} was trained with {key}={trained!r} but the config says {given!r}: prediction takes it from the "
            "checkpoint, so drop the setting (or retrain with it)"
        )


def load_checkpoint(
    path: str | os.PathLike, expect: Mapping[str, Any] | None = None, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, metadata)``; every ``expect`` item must equal the metadata's, else ``CheckpointError``."""
    meta = read_metadata(path)
    check_metadata(path, meta, expect or {})
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged ({plain_message(e)}); retrain or copy it again") from None
    return state, meta


def load_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Load ``state`` strictly into ``model``, with a message naming the file when it does not fit."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        detail = " ".join(str(e).split())[:300]
        raise CheckpointError(
            f"checkpoint {path} does not fit this model ({detail}); made by another version?"
        ) from None
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model (missing {list(missing)[:3]}, unexpected "
            f"{list(unexpected)[:3]}); was it made by another version?"
        )


def weights_digest(path: str | os.PathLike) -> str:
    """Content hash of a checkpoint file, for the stage cache keys of what the model computes."""
    return file_digest(path)


def save_resume_state(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Optimizer, scheduler, scaler, epoch and best score, apart from the weights; written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)
    return path


def load_resume_state(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """The whole resume state (``mmap``: its tensors mapped from the file, not read, until used)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"resume state {path} not found: nothing to resume, start without --resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any failure to read means the file cannot be trusted
        raise CheckpointError(f"resume state {path} cannot be read safely ({type(e).__name__}); start afresh") from None


_SUMMARIES: dict[tuple[str, int, int, int], dict[str, Any]] = {}


def resume_summary(path: str | os.PathLike) -> dict[str, Any]:
    """A resume state without its tensors (the weights, the optimiser's moments): whether it finished, its
    fingerprint and settings, its epoch and best score. What the checks before a stage read: the file is mapped,
    not read, and each file as it is (path, size, modification time, inode: a rewrite is a new file) is read once
    per process however many checks ask."""
    path = Path(path)
    try:
        found = path.stat()
    except OSError:
        found = None
    key = (str(path.absolute()), found.st_size, found.st_mtime_ns, found.st_ino) if found else None
    if key is None or key not in _SUMMARIES:
        state = load_resume_state(path, mmap=True)  # raises the CheckpointError of a missing or unreadable file
        summary = {k: v for k, v in state.items() if _tensor_free(v)}
        del state
        if key is None:
            return summary
        if len(_SUMMARIES) >= 256:
            _SUMMARIES.clear()
        _SUMMARIES[key] = summary
    return copy.deepcopy(_SUMMARIES[key])


def _tensor_free(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return False
    if isinstance(value, Mapping):
        return all(_tensor_free(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_tensor_free(v) for v in value)
    return True
