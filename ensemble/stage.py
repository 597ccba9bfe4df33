"""The vote as a library call: ``vote(cfg) -> VoteRun``.

``python ensemble/vote.py`` parses its flags into an ``EnsembleConfig``, calls ``vote`` and prints the result;
``dermpipe run`` calls it with the experiment file's ``ensemble`` section.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dermpipe.classification.backbones import DEFAULT_BACKBONES
from dermpipe.engine.run import start_stage_run
from dermpipe.ensemble.config import EnsembleConfig
from dermpipe.ensemble.stacked_tables import TableError, trained_backbones
from dermpipe.ensemble.voting import run_vote

logger = logging.getLogger(__name__)


def found_backbones(cfg: EnsembleConfig) -> tuple[list[str], str]:
    """The backbones trained under the classification root, and a line saying which (and which defaults are not);
    none is an error."""
    root, split = cfg.data.classification_root, cfg.data.fit_split
    found = trained_backbones(root, split)
    if not found:
        raise TableError(
            f"no trained backbone under {root} (no <backbone>/probs_{split}.csv): train one with "
            f"`python classification/train.py --backbone NAME --root {cfg.run.root}`, or pass --root (the run root) "
            "or --classification-root (the folder of backbone runs)"
        )
    missing = [b for b in DEFAULT_BACKBONES if b not in found]
    line = (f"vote: stacking the {len(found)} backbones trained under {root}: {', '.join(found)}"
            + (f" (defaults not trained: {', '.join(missing)})" if missing else ""))  # fmt: skip
    return found, line


@dataclass(frozen=True)
class VoteRun:
    """The fitted vote and every method's score on the test split (scored once, after every choice)."""

    run_dir: Path
    backbones: tuple[str, ...]
    balanced_accuracy: dict[str, float]  # method -> test balanced accuracy (methods.csv's rows)
    best_single: str  # the backbone chosen on the fit split
    refer_threshold: float
    temperature: float
    n_test: int
    summary: dict[str, Any]  # all of summary.json: intervals, paired differences, referral, settings
    confidence: float = 0.95
    refer_class: str = "mel"

    def line(self) -> str:
        s, scores = self.summary, self.balanced_accuracy
        meta = next(row for row in s["methods"] if row["method"] == "meta_network")
        interval = ""
        if "delta_low" in meta:
            interval = (f" (difference {meta['delta_vs_best_single']:+.4f}, {self.confidence:.0%} bootstrap interval "
                        f"{meta['delta_low']:+.4f} to {meta['delta_high']:+.4f})")  # fmt: skip
        versus = s.get("meta_network_vs", {}).get("mean_vote")
        against_mean = (f" (meta-network {versus['difference']:+.4f}, interval {versus['low']:+.4f} to "
                        f"{versus['high']:+.4f})" if versus else "")  # fmt: skip
        referral = s["referral_test"]
        missed = f", BELOW the {s['target_sensitivity']:.2f} target" if s.get("target_missed") else ""
        refer = (f"; {referral['referred_fraction']:.0%} referred below top probability {self.refer_threshold:.3f} "
                 f"({self.refer_class} sensitivity {referral['sensitivity_with_referral']:.3f}{missed})"
                 if referral else "")  # fmt: skip
        return (f"meta-network balanced accuracy {scores['meta_network']:.4f} vs best single backbone "
                f"{self.best_single} {scores['best_single']:.4f}{interval}; mean vote {scores['mean_vote']:.4f}"
                f"{against_mean}, logistic stacking {scores['logistic_stacking']:.4f}; {self.n_test} test images"
                f"{refer}; wrote {s['paths']['methods']}")  # fmt: skip


def vote(cfg: EnsembleConfig) -> VoteRun:
    """Fit the vote of ``cfg`` on its fit split and score it once on test, into ``cfg.run.out_dir`` (a finished vote
    on the same tables and settings is reused). No ``data.backbones``: every backbone trained under the root."""
    if not cfg.data.backbones:
        found, line = found_backbones(cfg)
        logger.info("%s", line)
        cfg = replace(cfg, data=replace(cfg.data, backbones=tuple(found)))
    run = start_stage_run(cfg, "ensemble")
    summary = run_vote(cfg, run)
    return VoteRun(
        run_dir=run.dir,
        backbones=tuple(summary["backbones"]),
        balanced_accuracy={row["method"]: row["balanced_accuracy"] for row in summary["methods"]},
        best_single=summary["best_single"],
        refer_threshold=float(summary["refer_threshold"]),
        temperature=float(summary["temperature"]),
        n_test=int(summary["n_test"]),
        summary=summary,
        confidence=cfg.evaluation.confidence,
        refer_class=cfg.calibration.refer_class,
    )
