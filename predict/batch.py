"""Batch prediction: a folder of photos -> lesion crops -> five classifiers -> meta-network vote -> one row per image.

Streams in chunks, so memory stays flat over any number of images; every stage goes through the cache, so a rerun
after adding ten images computes ten. When the manifest gives the truth (labels, lesion masks), the predictions are
scored against it as they stream (``dermpipe.predict.truth``).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dermpipe.data.manifest import Manifest, write_table
from dermpipe.engine import csvsafe
from dermpipe.engine.files import atomic_path, remove_stale_temporaries, write_text_atomic
from dermpipe.errors import plain_message
from dermpipe.predict import shards
from dermpipe.predict.predictor import EnsemblePredictor
from dermpipe.predict.report import (
    prune_report_files,
    write_report,
)
from dermpipe.predict.rows import picture_files, prediction_columns
from dermpipe.predict.tally import BatchInfo, BatchSummary, BatchTally, _summary
from dermpipe.predict.truth import TRUTH_OUTPUTS
from dermpipe.predict.writers import MaskFiles, PredictionTable, ReportPictures, Writer, record_of

logger = logging.getLogger(__name__)


def predict_folder(
    manifest: Manifest,
    predictor: EnsemblePredictor,
    output: str | os.PathLike,
    out_dir: str | os.PathLike,
    excluded: Sequence[Mapping[str, str]] = (),
    *,
    model_id: str = "",
) -> BatchSummary:
    """Write ``output`` (predictions CSV, rows in input order), ``skipped.csv`` (the unreadable inputs and the
    ``excluded`` files of the folder listing) and the optional outputs into ``out_dir``.

    ``model_id`` names the trained pipeline (a bundle's ``name@sha256:...`` or the vote's run folder): the ``model``
    column of every row and the report's first line. Where the manifest gives a row's ``label``, its ``truth`` and
    ``correct`` columns are filled and ``metrics.json`` with ``confusion.csv``/``.png`` are written; where it gives a
    ``mask_path``, the predicted mask is scored into ``segmentation_scores.csv`` (see ``dermpipe.predict.truth``).
    Returns the summary (``BatchSummary``).
    """
    out, output = Path(out_dir), Path(output)
    info = BatchInfo.of(predictor, model_id)
    _prepare_outputs(out, output, info.report)
    tally = BatchTally(info, manifest, excluded)
    _predict_rows(manifest, predictor, tally, output, out, out)
    return _write_outputs(out, tally, info, predictor.cache_counts())


def predict_part(
    manifest: Manifest,
    predictor: EnsemblePredictor,
    folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    excluded: Sequence[Mapping[str, str]] = (),
    *,
    model_id: str = "",
    part: Mapping[str, Any],
) -> BatchSummary:
    """One shard's part: ``manifest`` (its rows of the input list) and ``excluded`` (its excluded folder entries)
    predicted as ``predict_folder`` does, the rows into ``folder/predictions.csv``, the report's pictures under
    ``folder``, the rest of what the merge needs into ``folder/tally.json``, then ``folder/part.json`` (``part``, the
    shard's description, with the batch's settings and counts) last. Per-image outputs (masks, crops) go straight
    into ``out_dir``, where one process writes them. Returns the part's summary (no scores: the merge scores the
    whole set)."""
    folder, out = Path(folder), Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / shards.PART_FILE).unlink(missing_ok=True)  # unfinished from here until the part is whole again
    remove_stale_temporaries(folder)
    info = BatchInfo.of(predictor, model_id)
    tally = BatchTally(info, manifest, excluded)
    _predict_rows(manifest, predictor, tally, folder / shards.PREDICTIONS_FILE, folder, out)
    write_text_atomic(folder / shards.TALLY_FILE, json.dumps(tally.state()) + "\n")
    reused, computed, corrupt = predictor.cache_counts()
    summary = _summary(info, tally, None, (reused, computed, corrupt))
    counts = {"images": summary.images, "skipped": summary.skipped, "referred": summary.referred,
              "whole-image fallbacks": summary.fallbacks}  # fmt: skip
    cache = {"reused": reused, "computed": computed, "corrupt": corrupt}
    shards.write_part(folder, {**part, "batch": info.state(), "counts": counts, "cache": cache})
    return summary


def merge_parts(
    parts: Sequence[tuple[Path, Mapping[str, Any]]], out_dir: str | os.PathLike, output: str | os.PathLike
) -> BatchSummary:
    """The shards' finished parts (``shards.check_parts``, in shard order) joined into what ``predict_folder`` writes
    over the whole input list, byte for byte: the rows concatenated, the tallies added up, the report's pictures
    copied, then the same writers. Everything is read and checked before the first output is touched."""
    if not parts:
        raise shards.ShardError("no parts to merge")
    out, output = Path(out_dir), Path(output)
    info = BatchInfo.from_state(parts[0][1]["batch"])
    tally = BatchTally(info, Manifest(rows=(), classes=()))
    reused = computed = corrupt = 0
    columns = prediction_columns(info.classes)
    for folder, part in parts:
        name = f"shard {part['shard']} of {part['shards']}"
        again = f"make it again with `{part.get('command', 'dermpipe predict ...')}`"
        try:
            state = json.loads((folder / shards.TALLY_FILE).read_text(encoding="utf-8"))
            with open(folder / shards.PREDICTIONS_FILE, newline="") as f:
                header = next(csvsafe.reader(f), None)
        except (OSError, ValueError) as error:
            why = plain_message(error)
            raise shards.ShardError(f"{name}'s part in {folder} cannot be read ({why}): {again}") from None
        if header != columns:
            raise shards.ShardError(f"{name}'s {folder / shards.PREDICTIONS_FILE} has other columns: {again}")
        tally.add_state(state, folder)
        reused += int(part["cache"]["reused"])
        computed += int(part["cache"]["computed"])
        corrupt += int(part["cache"].get("corrupt", 0))
    pictures = [(tally.folders[id(row)], rel) for row in tally.selection.rows for rel in row.images.values()]
    for folder, rel in pictures:
        if not (folder / rel).is_file():
            part = next(p for f, p in parts if f == folder)
            raise shards.ShardError(f"shard {part['shard']} of {part['shards']} lacks the report picture "
                                    f"{folder / rel}: make it again with `{part.get('command')}`")  # fmt: skip
    _prepare_outputs(out, output, info.report)  # everything read and checked: from here on the outputs are written
    with _prediction_table(output, columns) as writer:
        for folder, _ in parts:
            with open(folder / shards.PREDICTIONS_FILE, newline="") as f:
                writer.writerows(csvsafe.DictReader(f))
    for folder, rel in pictures:  # the report's pictures, where one process leaves them beside the report
        with atomic_path(out / rel) as tmp:
            shutil.copyfile(folder / rel, tmp)
    return _write_outputs(out, tally, info, (reused, computed, corrupt))


def _prepare_outputs(out: Path, output: Path, report: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # what a killed run left half-written
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output.parent, recursive=False)
    if report:  # rewritten at the end: a run killed before then leaves no report that looks current
        (out / "report.html").unlink(missing_ok=True)
    for name in TRUTH_OUTPUTS:  # an earlier run's scores never pass for this input's
        (out / name).unlink(missing_ok=True)


@contextmanager
def _prediction_table(output: Path, columns: Sequence[str]) -> Iterator[csv.DictWriter]:
    """The predictions CSV, header written, rows to come; renamed into place when the block ends without error."""
    with atomic_path(output) as partial, open(partial, "w", newline="") as f:
        writer = csvsafe.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        yield writer


def _predict_rows(
    manifest: Manifest,
    predictor: EnsemblePredictor,
    tally: BatchTally,
    output: Path,
    report_dir: Path,
    out: Path,
) -> None:
    """Predict every row of ``manifest`` into the CSV ``output``, each image's record given to each output's writer
    (``dermpipe.predict.writers``): the table, ``tally``, the masks and crops under ``out``, the report's pictures under
    ``report_dir/report_files``."""
    cfg, classes, truth = predictor.cfg, predictor.classes, tally.truth
    pictures = picture_files(report_dir / "report_files", report_dir)
    gradcam_model = predictor.classifiers[0] if cfg.outputs.gradcam else None
    mask_threshold = predictor.segmenter.predict_cfg.threshold
    items = [(r["image_id"], r["image_path"]) for r in manifest.rows]
    with _prediction_table(output, prediction_columns(classes)) as table:
        writers: list[Writer] = [
            PredictionTable(table),
            tally,
            MaskFiles(out, mask_threshold, cfg.outputs.masks, cfg.outputs.crops, truth),
            ReportPictures(tally.selection, pictures, report_dir, gradcam_model),
        ]
        for crop, probs in tqdm(predictor.predict(items, tally.skipped), total=len(items), desc="predict", leave=False):
            answer = record_of(crop, probs, classes, predictor.refer_threshold, truth)
            for writer in writers:
                writer.add(crop, answer)


def _write_outputs(out: Path, tally: BatchTally, info: BatchInfo, cache: tuple[int, ...]) -> BatchSummary:
    """What follows the table: ``skipped.csv``, the ISIC CSV, the truth scores, then the report; the summary."""
    classes = list(info.classes)
    tally.skipped.write(out)
    if info.isic_csv:
        write_table(out / "isic_submission.csv", ["image", *[c.upper() for c in classes]], tally.isic_rows)
    metrics = tally.truth.write(out)
    summary = _summary(info, tally, metrics, cache)
    logger.info("prediction %s", summary.cache)  # in the log, not the report: a rerun writes the same report
    if info.report:
        write_report(
            out / "report.html",
            tally.selection.rows,
            classes,
            _report_summary(summary, metrics, len(tally.selection.rows)),
            tally.skipped.rows,
            predicted_counts=tally.predicted,
            quality_warnings=tally.quality,
        )
    prune_report_files(out, tally.selection.rows if info.report else ())  # only this report's pictures stay
    return summary


def _report_summary(summary: BatchSummary, metrics: Mapping[str, Any] | None, shown: int) -> dict[str, Any]:
    """The report's summary table: the run's summary with the scores against the truth spelled out, numbers rounded
    and what does not apply to this run left out; not the cache tally (it is in the log), so the same inputs and models
    give the same report byte for byte, however much a rerun found cached."""
    lines: dict[str, Any] = {"model": summary.model} if summary.model else {}
    lines["images"] = summary.images
    if shown < summary.images:
        lines["shown in this report"] = f"{shown} (to refer first, then wrong, then the rest)"
    lines.update({
        "skipped": summary.skipped,
        "referred": summary.referred,
        "whole-image fallbacks": summary.fallbacks,
        "backbones": ", ".join(summary.backbones),
        "refer threshold": f"{summary.refer_threshold:.3f}",
        "temperature": f"{summary.temperature:.3f}",
    })  # fmt: skip
    if not metrics:
        return lines
    outside = metrics.get("labels_outside_classes") or {}
    if metrics.get("scored") or outside:
        lines["scored against their label"] = metrics["scored"]
    if outside:
        named = ", ".join(f"{label} ({count})" for label, count in outside.items())
        lines["labels the model cannot name (not scored)"] = named
    if metrics.get("scored"):
        lines["balanced accuracy"] = _number(metrics["balanced_accuracy"])
        lines["accuracy"] = _number(metrics["accuracy"])
        lines["macro AUC (classes present)"] = _number(metrics["macro_auc"])
        refer = metrics.get("refer")
        if refer:
            lines[f"{refer['class']} sensitivity / specificity (referred = sent to a dermatologist)"] = (
                f"{_number(refer['sensitivity'])} / {_number(refer['specificity'])}"
            )
    segmentation = metrics.get("segmentation")
    if segmentation:
        n_missing = segmentation["missing"]
        missing = f" ({n_missing} true masks not scored: see segmentation_scores.csv)" if n_missing else ""
        lines["masks scored"] = f"{segmentation['scored']}{missing}"
        if segmentation["scored"]:
            lines["mask Jaccard / Dice (mean)"] = (
                f"{_number(segmentation['jaccard'])} / {_number(segmentation['dice'])}"
            )
    return lines


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
