"""Predict a folder of photos end to end: ``python ensemble/predict.py --input DIR --output predictions.csv``.

The script stays where the pipeline's description puts it; the work is done by ``dermpipe.predict`` (``dermpipe
predict`` runs the same ``main``).
"""

from __future__ import annotations

from dermpipe.predict.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
