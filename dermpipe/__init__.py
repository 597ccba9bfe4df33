"""dermpipe: a two-stage dermoscopy pipeline (U-Net lesion crops, five SE-augmented CNN classifiers, a learned vote).

The stage folders of the source tree (``configs/ engine/ data/ segmentation/ classification/ ensemble/ bundle/
predict/ pipeline/ serve/``) install as subpackages of this one namespace, so ``import dermpipe.data`` never collides
with a user's own ``data`` package.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dermpipe.version import __version__

# ``python segmentation/train.py`` puts the script's own stage folder first on sys.path, where its files would shadow
# libraries of the same name; every stage script imports dermpipe first, so that folder is dropped here.
_STAGE_FOLDERS = (
    "configs",
    "engine",
    "data",
    "segmentation",
    "classification",
    "ensemble",
    "bundle",
    "predict",
    "pipeline",
    "serve",
)
_main = getattr(sys.modules.get("__main__"), "__file__", None)
if _main and sys.path and sys.path[0]:
    _script_dir = Path(_main).resolve().parent
    if (
        _script_dir.name in _STAGE_FOLDERS
        and Path(sys.path[0]).resolve() == _script_dir
        and _script_dir.parent == Path(__file__).resolve().parent.parent
    ):
        del sys.path[0]

# The Python API (``dermpipe.predict.api``), imported on first use so that ``import dermpipe`` stays light.
_API = ("load", "to_frame", "Model", "Prediction", "Skipped", "Segmentation", "Explanation")
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> object:
    if name in _API:
        from dermpipe.predict import api

        return getattr(api, name)
    raise AttributeError(f"module 'dermpipe' has no attribute {name!r}")
