"""What a batch prediction counts as it streams (images, referrals, the truth scores, the report's selection), the
settings its outputs record, and its summary."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dermpipe.data.manifest import Manifest
from dermpipe.predict.predictor import EnsemblePredictor, cache_text
from dermpipe.predict.report import (
    ReportRow,
    ReviewSelection,
)
from dermpipe.predict.rows import Prediction
from dermpipe.predict.truth import TruthScorer
from dermpipe.segmentation.prediction import CropResult, SkipLog


@dataclass(frozen=True)
class BatchInfo:
    """What a batch's outputs say besides its rows: the model and its settings, and which outputs are written. A shard
    records it in its ``part.json``, so the merge writes what the one process would without loading the model."""

    model_id: str
    classes: tuple[str, ...]
    backbones: tuple[str, ...]
    refer_class: str | None
    refer_threshold: float
    temperature: float
    mask_threshold: float
    report: bool
    report_max_images: int
    isic_csv: bool

    @classmethod
    def of(cls, predictor: EnsemblePredictor, model_id: str) -> BatchInfo:
        outputs = predictor.cfg.outputs
        return cls(
            model_id=model_id,
            classes=tuple(predictor.classes),
            backbones=tuple(predictor.backbones),
            refer_class=predictor.refer_class,
            refer_threshold=predictor.refer_threshold,
            temperature=predictor.temperature,
            mask_threshold=float(predictor.segmenter.predict_cfg.threshold),
            report=bool(outputs.report),
            report_max_images=int(outputs.report_max_images),
            isic_csv=bool(outputs.isic_csv),
        )

    def state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> BatchInfo:
        return cls(**{**state, "classes": tuple(state["classes"]), "backbones": tuple(state["backbones"])})


class BatchTally:
    """What a batch collects besides its rows, image by image: counts, skipped inputs, the report's rows, the truth
    scores' inputs. A shard saves its tally (``state``); the merge adds the parts' up in input order (``add_state``),
    which collects what one process over every image does."""

    def __init__(self, info: BatchInfo, manifest: Manifest, excluded: Sequence[Mapping[str, str]] = ()) -> None:
        self.truth = TruthScorer(
            manifest, info.classes, info.refer_class, info.refer_threshold, info.mask_threshold, model_id=info.model_id
        )
        self.selection = ReviewSelection(info.report_max_images if info.report else 0)
        self.skipped = SkipLog(excluded)
        self.excluded = len(self.skipped)  # the folder listing's excluded entries: skipped.csv's first rows
        self.isic = info.isic_csv
        self.isic_rows: list[dict[str, str]] = []
        self.predicted: Counter[str] = Counter()
        self.images = self.referred = self.fallbacks = self.quality = 0
        self.folders: dict[int, Path] = {}  # id(report row) -> the folder its pictures are under (merged tallies)

    def add(self, crop: CropResult, answer: Prediction) -> None:
        """Count one predicted image (and keep its row of the ISIC CSV when that is written)."""
        self.images += 1
        self.referred += answer.refer
        self.fallbacks += bool(crop.box.fallback)
        self.quality += bool(answer.quality)
        self.predicted[answer.predicted] += 1
        if self.isic:
            self.isic_rows.append(
                {"image": answer.image_id, **{c.upper(): f"{p:.6f}" for c, p in answer.probabilities.items()}}
            )

    def state(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "referred": self.referred,
            "fallbacks": self.fallbacks,
            "quality": self.quality,
            "predicted": dict(self.predicted),
            "excluded": self.excluded,
            "skipped": self.skipped.rows,
            "isic": self.isic_rows,
            "report": [{**asdict(r), "quality": list(r.quality)} for r in self.selection.rows],
            "truth": self.truth.state(),
        }

    def add_state(self, state: Mapping[str, Any], folder: Path) -> None:
        """Add the tally of the next part (its pictures under ``folder``) after what this one holds."""
        self.images += int(state["images"])
        self.referred += int(state["referred"])
        self.fallbacks += int(state["fallbacks"])
        self.quality += int(state["quality"])
        self.predicted.update({str(k): int(v) for k, v in state["predicted"].items()})
        rows, excluded = [dict(r) for r in state["skipped"]], int(state["excluded"])
        self.skipped.rows[self.excluded : self.excluded] = rows[:excluded]  # every excluded entry, then the unreadable
        self.excluded += excluded
        self.skipped.rows.extend(rows[excluded:])
        self.isic_rows.extend(dict(r) for r in state["isic"])
        for saved in state["report"]:  # in review order per part: the selection keeps the first of all parts'
            row = ReportRow(**{**saved, "quality": tuple(saved["quality"])})
            self.selection.add(row)
            self.folders[id(row)] = folder
        self.truth.add_state(state["truth"])


@dataclass(frozen=True)
class BatchSummary:
    """What a batch prediction did: counts, the scores against the truth where the manifest gave it, the cache."""

    model: str
    images: int
    skipped: int
    referred: int
    fallbacks: int  # images classified whole: no lesion box found
    scored: int  # images scored against their label
    balanced_accuracy: float | None  # None: none was scored (or a shard's part: the merge scores the whole set)
    masks_scored: int
    mask_jaccard: float | None
    backbones: tuple[str, ...]
    refer_threshold: float
    temperature: float
    cache: str

    def line(self) -> str:
        """The summary in one line (without the file it wrote)."""
        scored = ""
        if self.balanced_accuracy is not None:
            scored = f"; balanced accuracy {self.balanced_accuracy:.3f} on {self.scored} labelled"
        elif self.scored:  # a shard's part: the merge scores the whole set
            scored = f"; {self.scored} labelled (scored when the parts are merged)"
        if self.mask_jaccard is not None:
            scored += f"; mask Jaccard {self.mask_jaccard:.3f} on {self.masks_scored} true masks"
        return (
            f"{self.images} images ({self.referred} to refer, {self.fallbacks} whole-image fallbacks), "
            f"{self.skipped} skipped{scored}; {self.cache}"
        )


def _summary(
    info: BatchInfo, tally: BatchTally, metrics: Mapping[str, Any] | None, cache: tuple[int, ...]
) -> BatchSummary:
    truth = tally.truth
    return BatchSummary(
        model=info.model_id,
        images=tally.images,
        skipped=len(tally.skipped),
        referred=tally.referred,
        fallbacks=tally.fallbacks,
        scored=truth.scored,
        balanced_accuracy=metrics["balanced_accuracy"] if truth.scored and metrics else None,
        masks_scored=truth.masks_scored,
        mask_jaccard=((metrics or {}).get("segmentation") or {}).get("jaccard"),
        backbones=tuple(info.backbones),
        refer_threshold=info.refer_threshold,
        temperature=info.temperature,
        cache=cache_text(*cache),
    )
