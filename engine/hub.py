"""Pretrained weights from a model hub: where a download would come from, its local copy, and a quick reachability
probe, so that an offline machine fails at once with the caller's message instead of retrying the hub for a minute.

A download is worth trying only when its weights are not cached already (huggingface_hub's cache, torch hub's
``checkpoints`` folder) and neither ``HF_HUB_OFFLINE`` nor ``TRANSFORMERS_OFFLINE`` is set and a TCP connection to the
host it would use (or the proxy in between) opens within ``PROBE_TIMEOUT_S``.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

PROBE_TIMEOUT_S = 3.0
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
HF_DEFAULT_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class Download:
    """Pretrained weights a library would fetch from ``url``, unless ``cached`` (a complete local copy) is set."""

    url: str
    cached: str | None = None
    hf: bool = False  # from the Hugging Face hub (else a plain URL, cached by torch hub)


def hf_endpoint() -> str:
    """The hub's address as huggingface_hub uses it (``HF_ENDPOINT``, default https://huggingface.co)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return os.environ.get("HF_ENDPOINT", HF_DEFAULT_ENDPOINT).rstrip("/")
    return str(constants.ENDPOINT).rstrip("/")


def hf_download(repo_id: str, filenames: str | Sequence[str], revision: str | None = None) -> Download:
    """A file of a hub repository: the first of ``filenames`` (alternatives, in the order tried) in huggingface_hub's
    cache, else a download of the first one."""
    names = [filenames] if isinstance(filenames, str) else list(filenames)
    url = f"{hf_endpoint()}/{repo_id}/resolve/{revision or 'main'}/{names[0]}"
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return Download(url, None, hf=True)
    for name in names:
        path = try_to_load_from_cache(repo_id, name, revision=revision)
        if isinstance(path, str) and os.path.isfile(path):  # not None, nor the "known not to exist" marker
            return Download(url, path, hf=True)
    return Download(url, None, hf=True)


def url_download(url: str) -> Download:
    """A plain URL download as torch hub (and timm, and older smp) caches it: ``<torch hub dir>/checkpoints/<name>``."""
    import torch.hub

    name = os.path.basename(urllib.parse.urlsplit(url).path)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", name)
    return Download(url, path if name and os.path.isfile(path) else None)


def timm_download(timm_name: str) -> Download | None:
    """Where ``timm.create_model(timm_name, pretrained=True)`` takes its weights from (timm's own order: the Hugging
    Face hub when the model has a hub id, else its URL); None when timm knows no pretrained weights for it."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(timm_name)
    except RuntimeError:  # an unknown pretrained tag: timm says so itself
        return None
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        name = cfg.hf_hub_filename or "pytorch_model.bin"
        if cfg.hf_hub_filename and cfg.custom_load == "hf":
            # a loader of its own that needs the hub's API: a cached copy is left to it (None), no overlay applies
            download = hf_download(repo_id, name, revision or None)
            return None if download.cached else download
        return hf_download(repo_id, [*_safetensors_twins(name), name], revision or None)
    if cfg.url:
        return url_download(cfg.url)
    return None


def _safetensors_twins(name: str) -> list[str]:
    """The safetensors files timm tries before a hub ``.bin`` (timm.models._hub._get_safe_alternatives)."""
    if name == "pytorch_model.bin":
        return ["model.safetensors"]
    if name == "open_clip_pytorch_model.bin":
        return ["open_clip_model.safetensors"]
    return [name[: -len(".bin")] + ".safetensors"] if name.endswith(".bin") else []


def timm_cache_overlay(download: Download | None) -> dict[str, Any]:
    """The ``pretrained_cfg_overlay`` that makes timm load ``download``'s cached copy as a local file (no network);
    empty when there is no cached copy."""
    if download is None or download.cached is None:
        return {}
    overlay: dict[str, Any] = {"file": download.cached}
    if download.hf:
        overlay["custom_load"] = False  # the hub files are plain state dicts, whatever the URL weights need
    return overlay


def offline_flag() -> str | None:
    """``NAME=value`` of the first offline switch that is on (read now, not at import), else None."""
    for name in OFFLINE_VARIABLES:
        value = os.environ.get(name, "")
        if value.strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{name}={value}"
    return None


def _probe_address(url: str) -> tuple[str, int, str]:
    """The host and port a request for ``url`` connects to first (its proxy's, when one is set), and a note."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme or "https"
    host = parts.hostname or ""
    port = parts.port or (443 if scheme == "https" else 80)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(scheme) or proxies.get("all")
    if proxy and host and not urllib.request.proxy_bypass(host):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if p.hostname:
            return p.hostname, p.port or (443 if p.scheme == "https" else 80), f" (the proxy for {host})"
    return host, port, ""


def probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when a TCP connection to ``url``'s host (or its proxy) opens within ``timeout`` seconds, else why not.

    The name lookup counts towards the timeout too: the connection is tried on a daemon thread and given up on.
    """
    host, port, note = _probe_address(url)
    if not host:
        return f"no host in {url!r}"
    outcome: list[Exception | None] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                pass
        except Exception as e:  # OSError mostly; a host name that cannot even be encoded too
            outcome.append(e)
        else:
            outcome.append(None)

    thread = threading.Thread(target=connect, name="dermpipe-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        return f"{host}:{port}{note} gave no answer within {timeout:g} s"
    error = outcome[0]
    if error is None:
        return None
    return f"cannot connect to {host}:{port}{note}: {getattr(error, 'strerror', None) or error}"


def holds_weights_of(module: Any, path: str | os.PathLike) -> bool:
    """Whether ``module`` holds at least one multi-dimensional tensor of the weights file ``path`` (equal in value):
    the check that a non-strict load took anything at all. timm loads a model without its head (and smp's encoders)
    non-strictly, so a file made for another network would otherwise leave the random initialisation in place."""
    import torch
    from timm.models import load_state_dict

    by_shape: dict[tuple[int, ...], list[Any]] = {}
    for value in load_state_dict(str(path)).values():
        if getattr(value, "ndim", 0) >= 2:
            by_shape.setdefault(tuple(value.shape), []).append(value)
    for value in module.state_dict().values():
        if value.ndim >= 2 and value.is_floating_point():
            for candidate in by_shape.get(tuple(value.shape), ()):
                if candidate.is_floating_point() and torch.equal(candidate.to(value.dtype), value.cpu()):
                    return True
    return False


def unreachable(download: Download | None, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why ``download`` cannot be had now (offline switch on, or its host unreachable, and no cached copy), else
    None: cached weights, reachable hosts and unknown sources (None) all let the library go ahead."""
    if download is None or download.cached is not None:
        return None
    flag = offline_flag()
    why = f"{flag} is set" if flag else probe(download.url, timeout)
    return f"{why}, and the weights are not in the local cache" if why else None
