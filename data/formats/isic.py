"""ISIC challenge readers: 2016 (ISBI), 2017, 2018 (Task 1 masks, Task 3 labels), 2019 and SIIM-ISIC 2020."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dermpipe.data.formats.ham10000 import add_ham_metadata
from dermpipe.data.formats.layout import (
    ConversionResult,
    clean_value,
    isic_id,
    isic_layout,
    official_split,
    refuse_unread_label_tables,
)
from dermpipe.data.formats.tables import read_records, read_table, table_files, table_header

ISIC2017_CLASSES: tuple[str, ...] = ("melanoma", "nevus", "seborrheic_keratosis")
ISIC2018_CLASSES: tuple[str, ...] = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
ISIC2019_CLASSES: tuple[str, ...] = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
BINARY_CLASSES: tuple[str, ...] = ("benign", "malignant")
_GROUND_TRUTH = r"ground_?truth"  # the published label tables' names: *_GroundTruth.csv


def _one_hot(record: dict[str, str], columns: Sequence[str], names: Sequence[str]) -> tuple[str | None, int]:
    """The class whose column holds 1 (floats like ``1.0`` allowed) and the number of 1s; None when not exactly one."""
    hits: list[str] = []
    for column, name in zip(columns, names):
        try:
            value = float(record.get(column, "").replace(",", "."))  # 1,0 from a decimal-comma export
        except ValueError:
            return None, -1
        if value == 1.0:
            hits.append(name)
        elif value != 0.0:
            return None, -1
    return (hits[0] if len(hits) == 1 else None), len(hits)


def read_isic2016(root: Path) -> ConversionResult:
    """ISIC 2016 (ISBI): Part 3 ground truth is a header-less ``id,benign|malignant`` CSV (test: ``id,0.0|1.0``)."""
    layout, files = isic_layout(root)
    values = {"benign": "benign", "malignant": "malignant", "0": "benign", "1": "malignant"}
    values |= {"0.0": "benign", "1.0": "malignant"}
    found = 0
    for table in table_files(files):
        rows = read_table(table)
        if not rows or len(rows[0]) != 2:
            continue
        body = rows if isic_id(rows[0][0]) else rows[1:]  # the published file has no header; tolerate one
        if not body or not isic_id(body[0][0]) or body[0][1].lower() not in values:
            continue
        found += 1
        if body is not rows:
            layout.report.notes.append(f"{table.name}: skipped a header row {rows[0]}")
        for row in body:
            image_id = isic_id(row[0])
            if image_id is None or len(row) < 2:
                layout.report.notes.append(f"{table.name}: unreadable row {row}")
                continue
            label = values.get(row[1].lower())
            layout.add_label(image_id, label, table, f"value {row[1]!r} is not benign/malignant")
    if not found:
        refuse_unread_label_tables(files, _GROUND_TRUTH, "header-less rows of an ISIC id and benign/malignant")
        layout.report.notes.append("no Part 3 ground truth found (a header-less CSV of id,benign|malignant)")
    return layout.finish(BINARY_CLASSES, "ISIC_*.jpg")


def read_isic2017(root: Path) -> ConversionResult:
    """ISIC 2017: ``image_id,melanoma,seborrheic_keratosis`` one-hot floats (both 0 = nevus), Part 1 masks."""
    layout, files = isic_layout(root)
    found = 0
    for table in table_files(files):
        header = table_header(table)
        if {"image_id", "melanoma", "seborrheic_keratosis"} <= header:
            found += 1
            for record in read_records(table)[1]:
                image_id = isic_id(record.get("image_id", ""))
                if image_id is None:
                    continue
                hit, ones = _one_hot(record, ("melanoma", "seborrheic_keratosis"), ("melanoma", "seborrheic_keratosis"))
                label = hit if hit else ("nevus" if ones == 0 else None)
                layout.add_label(image_id, label, table, "melanoma and seborrheic_keratosis both 1, or not 0/1")
        elif "image_id" in header and header & {"age_approximate", "sex"}:
            for record in read_records(table)[1]:
                if image_id := isic_id(record.get("image_id", "")):
                    layout.add_metadata(image_id, {"age": record.get("age_approximate"), "sex": record.get("sex")})
    if not found:
        refuse_unread_label_tables(files, _GROUND_TRUTH, "the columns image_id, melanoma, seborrheic_keratosis")
        layout.report.notes.append("no Part 3 ground truth found (image_id,melanoma,seborrheic_keratosis)")
    return layout.finish(ISIC2017_CLASSES, "ISIC_*.jpg")


def read_isic2018(root: Path) -> ConversionResult:
    """ISIC 2018: Task 1 masks and/or Task 3 one-hot labels; lesion groups from HAM10000 metadata when present."""
    layout, files = isic_layout(root)
    columns = tuple(c.lower() for c in ISIC2018_CLASSES)
    found = 0
    for table in table_files(files):
        header = table_header(table)
        if "image" in header and set(columns) <= header:
            found += 1
            for record in read_records(table)[1]:
                if image_id := isic_id(record.get("image", "")):
                    label, _ = _one_hot(record, columns, ISIC2018_CLASSES)
                    layout.add_label(image_id, label, table, "not exactly one 1 among MEL..VASC")
        elif "lesion_id" in header and header & {"image", "image_id"}:
            for record in read_records(table)[1]:
                add_ham_metadata(layout, record)
    if not found:
        refuse_unread_label_tables(files, _GROUND_TRUTH, "the columns image, MEL, NV, BCC, AKIEC, BKL, DF, VASC")
        layout.report.notes.append(
            "no Task 3 ground truth found (image,MEL,NV,BCC,AKIEC,BKL,DF,VASC): images unlabelled"
        )
    if not layout.groups:
        layout.report.notes.append("no lesion groups (HAM10000_metadata or Task 3 LesionGroupings CSV): one per image")
    result = layout.finish(ISIC2018_CLASSES, "ISIC_*.jpg")
    if found and layout.masks:
        result.report.notes.append("Task 1 (masks) and Task 3 (labels) cover different images in the challenge")
    return result


def read_isic2019(root: Path) -> ConversionResult:
    """ISIC 2019: one-hot ``image,MEL,...,SCC,UNK`` ground truth; lesion_id, age, sex, site from the metadata CSV."""
    layout, files = isic_layout(root)
    found = 0
    for table in table_files(files):
        header = table_header(table)
        if "image" in header and {"mel", "nv", "scc"} <= header:
            found += 1
            classes = [c for c in ISIC2019_CLASSES if c.lower() in header]
            for record in read_records(table)[1]:
                if image_id := isic_id(record.get("image", "")):
                    label, _ = _one_hot(record, [c.lower() for c in classes], classes)
                    layout.add_label(image_id, label, table, f"not exactly one 1 among {','.join(classes)}")
        elif "image" in header and header & {"lesion_id", "age_approx", "anatom_site_general"}:
            for record in read_records(table)[1]:
                if image_id := isic_id(record.get("image", "")):
                    if lesion := clean_value(record.get("lesion_id")):
                        layout.groups.setdefault(image_id, lesion)
                    site = record.get("anatom_site_general")
                    layout.add_metadata(
                        image_id, {"age": record.get("age_approx"), "sex": record.get("sex"), "site": site}
                    )
    if not found:
        refuse_unread_label_tables(files, _GROUND_TRUTH, "the columns image, MEL, NV, BCC, AK, BKL, DF, VASC, SCC")
        layout.report.notes.append("no ground truth found (image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK): images unlabelled")
    # UNK is an empty column in the training ground truth; a class nobody carries would only confuse the metrics.
    uses_unk = "UNK" in layout.labels.values()
    classes = ISIC2019_CLASSES if uses_unk else ISIC2019_CLASSES[:-1]
    return layout.finish(classes, "ISIC_*.jpg")


def read_isic2020(root: Path) -> ConversionResult:
    """SIIM-ISIC 2020: ``train.csv`` (``target`` 0/1 = benign/malignant), groups by ``patient_id``."""
    layout, files = isic_layout(root)
    found = 0
    for table in table_files(files):
        header = table_header(table)
        if not header & {"image_name", "image"} or not header & {"patient_id", "patient", "target"}:
            continue
        labelled = bool(header & {"target", "benign_malignant"})
        found += int(labelled)
        for record in read_records(table)[1]:
            image_id = isic_id(record.get("image_name") or record.get("image") or "")
            if image_id is None:
                continue
            if patient := clean_value(record.get("patient_id") or record.get("patient")):
                layout.groups.setdefault(image_id, patient)
            layout.add_metadata(
                image_id,
                {
                    "age": record.get("age_approx"),
                    "sex": record.get("sex"),
                    "site": record.get("anatom_site_general_challenge") or record.get("anatom_site_general"),
                    "diagnosis": record.get("diagnosis"),
                    "lesion_id": record.get("lesion_id"),
                },
            )
            if labelled:
                target = record.get("target", "").strip()
                if target:
                    label = {"0": "benign", "1": "malignant", "0.0": "benign", "1.0": "malignant"}.get(target)
                else:
                    word = record.get("benign_malignant", "").strip().lower()
                    label = word if word in BINARY_CLASSES else None
                layout.add_label(image_id, label, table, f"target {target!r} is not 0/1")
            elif split := official_split(table, layout.root, include_name=True):
                layout.label_splits.setdefault(image_id, split)
    if not found:
        expected = "the columns image_name, patient_id and target (or benign_malignant)"
        refuse_unread_label_tables(files, _GROUND_TRUTH + r"|^train\.", expected)
        layout.report.notes.append("no train.csv with a target column found: images unlabelled")
    return layout.finish(BINARY_CLASSES, "ISIC_*.jpg")
