"""Where a cold-cache batch prediction spends its time, step by step (benchmarks/onnx_speed.py --profile;
BENCHMARKS.md): one pass under cProfile, the main thread's seconds grouped by the pipeline's own functions.

Steps: reading (hash, decode, checks, preprocessing, cache lookup: ``SegmentationPredictor.prepare``, or the wait for
the reading thread when ``run.prefetch`` reads ahead), the U-Net (``predict_probabilities``: its TTA views and
forward), crops (mask, box, crop, cache write: the rest of ``_run_batch``), the classifiers (``scored``: crop
preprocessing, forwards, cache), the vote and its checks (the rest of ``judge``), rows and files (the rest)."""

from __future__ import annotations

import cProfile
import pstats
from collections.abc import Callable
from typing import Any

STEPS = ("reading", "U-Net", "crops", "classifiers", "vote", "rows and files")
# (file suffix, function) -> the step its cumulative time counts in
FUNCTIONS = {
    ("segmentation/prediction.py", "prepare"): "reading",
    ("concurrent/futures/_base.py", "result"): "reading",  # waiting for the reading thread
    ("segmentation/prediction.py", "predict_probabilities"): "U-Net",
    ("segmentation/prediction.py", "_run_batch"): "crops",
    ("classification/prediction.py", "scored"): "classifiers",
    ("predict/predictor.py", "judge"): "vote",
}


def _cumulative(stats: pstats.Stats) -> dict[str, float]:
    seconds = dict.fromkeys(FUNCTIONS.values(), 0.0)
    for (filename, _, name), (_, _, _, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        for (suffix, function), step in FUNCTIONS.items():
            if name == function and filename.endswith(suffix):
                seconds[step] += cumulative
    return seconds


def step_seconds(run: Callable[[], Any]) -> dict[str, float]:
    """Seconds per step of ``run()`` (a whole prediction), from the main thread's profile; nested steps are taken out
    of the step around them (the U-Net out of crops, the classifiers out of the vote)."""
    profile = cProfile.Profile()
    profile.enable()
    run()
    profile.disable()
    stats = pstats.Stats(profile)
    total = max(stats.total_tt, 1e-9)  # type: ignore[attr-defined]
    s = _cumulative(stats)
    s["crops"] = max(0.0, s["crops"] - s["U-Net"])
    s["vote"] = max(0.0, s["vote"] - s["classifiers"])
    s["rows and files"] = max(0.0, total - sum(s.values()))
    return {step: s[step] for step in STEPS} | {"total": total}
