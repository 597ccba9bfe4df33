"""Config loading into frozen dataclasses: defaults < ``--config`` YAML < ``--set a.b=value`` < named flags.

Unknown keys and wrong types fail naming the key (with a "did you mean"); the resolved config is saved as YAML.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from dermpipe.configs.ranges import check_ranges
from dermpipe.configs.schema import ROOT_LAYOUT
from dermpipe.errors import DermpipeError, did_you_mean

T = TypeVar("T")

CONFIG_DIR = Path(__file__).resolve().parent


class ConfigError(DermpipeError):
    """A config key that does not exist or a value of the wrong type."""


def default_config_path(stage: str) -> Path:
    """The YAML shipped for a stage, e.g. ``configs/segmentation.yaml``."""
    return CONFIG_DIR / f"{stage}.yaml"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``, converting where the meaning is unambiguous."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}{did_you_mean(str(value), map(str, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin is tuple or tp is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args or [Any] * len(value))))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # PyYAML reads 1e-3 as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping; fields absent from ``data`` keep their defaults."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        raise ConfigError(f"unknown config key '{prefix}{k}'{did_you_mean(k, fields)}")
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        check_ranges(cls, kwargs, prefix)  # every count, size and timeout against configs/ranges.py
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # a section's own validation (__post_init__)
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """A plain nested dict (tuples as lists) of a config dataclass, for YAML and hashing."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return v

    return plain(config)


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """``["train.lr=1e-3", "model.encoder=resnet18"]`` -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=5")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p} is both a value and a section")
        node[parts[-1]] = value
    return out


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections at the top level")
    return data


def load_config(
    cls: type[T],
    path: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
    flags: Mapping[str, Any] | None = None,
) -> T:
    """Resolve a config: dataclass defaults < YAML file < ``--set`` overrides < named flags (``None`` flags ignored).

    ``flags`` maps dotted keys to values, e.g. ``{"run.device": args.device}``; a ``None`` value means the flag was
    not given, so it never overrides (as timm's ``create_model`` ignores ``None`` kwargs).
    """
    data = to_dict(cls())
    if path is not None:
        data = _merge(data, load_yaml(path))
    data = _merge(data, parse_set(overrides))
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    flag_items = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in given.items()]
    data = _merge(data, parse_set(flag_items))
    config = place_under_root(from_dict(cls, data))
    check_cache_dir(config)
    return config


def check_cache_dir(config: Any) -> None:
    """Refuse a ``run.cache_dir`` that is a file, or lies under one, before any stage writes anything."""
    cache = getattr(getattr(config, "run", None), "cache_dir", "")
    if not cache:
        return
    for path in (Path(cache), *Path(cache).absolute().parents):
        if path.exists() and not path.is_dir():
            where = "is a file" if path == Path(cache) else f"lies under {path}, which is a file"
            raise ConfigError(f"run.cache_dir {cache} {where}, not a folder: pass a folder path (created when "
                              "missing) with --set run.cache_dir=DIR, or move the file away")  # fmt: skip


def _get(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = getattr(config, part)
    return config


def _replace(config: Any, key: str, value: Any) -> Any:
    head, _, rest = key.partition(".")
    inner = _replace(getattr(config, head), rest, value) if rest else value
    return dataclasses.replace(config, **{head: inner})


def place_under_root(config: T) -> T:
    """Fill the path settings left empty with their place under ``run.root``.

    A stage config names its paths in ``ROOT_PATHS`` (dotted key -> entry of ``configs.schema.ROOT_LAYOUT``, with an
    optional file name after a slash); a path given explicitly is kept.
    """
    paths: Mapping[str, str] = getattr(type(config), "ROOT_PATHS", {})
    root = Path(_get(config, "run.root")) if paths else Path()
    for key, where in paths.items():
        if _get(config, key) == "":
            folder, _, name = where.partition("/")
            path = root / ROOT_LAYOUT[folder]
            config = _replace(config, key, str(path / name if name else path))
    return config


def config_hash(config: Any) -> str:
    """A short stable hash of the resolved config."""
    blob = json.dumps(to_dict(config), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
