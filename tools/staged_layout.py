"""The installed layout of ``dermpipe``, staged from the source tree for tools that read source folders as they lie.

setup.cfg's ``package_dir`` installs the stage folders beside ``dermpipe/`` as its subpackages (``data/`` is
``dermpipe.data``). import-linter (tests/test_layers.py) and mkdocstrings (docs/hooks.py) find a package as one folder,
so both read a staged copy made of links to the source: ``dermpipe/`` with every mapped folder inside it. Nothing is
written in the source tree.
"""

from __future__ import annotations

import configparser
import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """setup.cfg's ``package_dir``: package name -> source folder, e.g. ``dermpipe.data`` -> ``<root>/data``."""
    parser = configparser.ConfigParser()
    parser.read(root / "setup.cfg")
    mapping = {}
    for line in parser["options"]["package_dir"].strip().splitlines():
        name, _, folder = line.partition("=")
        mapping[name.strip()] = (root / folder.strip()).resolve()
    return mapping


def _link(source: Path, target: Path) -> None:
    try:
        os.symlink(source, target, target_is_directory=source.is_dir())
    except OSError:  # no symlinks here (Windows without the privilege): copy instead
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)


def stage_layout(dest: Path, root: Path = ROOT) -> Path:
    """Link the installed layout of ``dermpipe`` into ``dest`` (``dest/dermpipe/data`` -> ``<root>/data``, ...)."""
    mapping = package_dirs(root)
    top = dest / "dermpipe"
    top.mkdir(parents=True)
    for entry in mapping.pop("dermpipe").iterdir():
        if entry.name != "__pycache__":
            _link(entry, top / entry.name)
    for name in sorted(mapping, key=lambda n: n.count(".")):  # parents before their subpackages
        target = dest.joinpath(*name.split("."))
        if target.exists():  # a nested mapping that only repeats where the parent's folder already holds it
            if target.resolve() != mapping[name]:
                raise RuntimeError(f"setup.cfg's package_dir: {name} maps to {mapping[name]}, but {target} is there")
            continue
        _link(mapping[name], target)
    return dest
