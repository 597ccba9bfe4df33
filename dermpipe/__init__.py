"""dermpipe: a two-stage dermoscopy pipeline (U-Net lesion crops, five SE-augmented CNN classifiers, a learned vote).

The stage folders of the source tree (``configs/ engine/ data/ segmentation/ classification/ ensemble/``) install as
subpackages of this one namespace, so ``import dermpipe.data`` never collides with a user's own ``data`` package.
"""

from __future__ import annotations

import sys
from pathlib import Path

__version__ = "0.1.0"

# ``python segmentation/train.py`` puts the script's own stage folder first on sys.path, where its files would shadow
# libraries of the same name; every stage script imports dermpipe first, so that folder is dropped here.
_STAGE_FOLDERS = ("configs", "engine", "data", "segmentation", "classification", "ensemble")
_main = getattr(sys.modules.get("__main__"), "__file__", None)
if _main and sys.path and sys.path[0]:
    _script_dir = Path(_main).resolve().parent
    if (
        _script_dir.name in _STAGE_FOLDERS
        and Path(sys.path[0]).resolve() == _script_dir
        and _script_dir.parent == Path(__file__).resolve().parent.parent
    ):
        del sys.path[0]
