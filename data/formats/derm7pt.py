"""Derm7pt reader: ``meta/meta.csv`` dermoscopic images and diagnoses, the official ``*_indexes.csv`` split."""

from __future__ import annotations

import os
from pathlib import Path

from dermpipe.data.formats.layout import (
    ConversionError,
    ConversionResult,
    Layout,
    clean_value,
    refuse_unread_label_tables,
    require_root,
    scan_files,
    unique_ids,
)
from dermpipe.data.formats.tables import read_records, read_table, table_files, table_header
from dermpipe.data.reading import IMAGE_EXTENSIONS


def read_derm7pt(root: Path) -> ConversionResult:
    """Derm7pt: ``meta/meta.csv`` (dermoscopic image in ``derm``, ``diagnosis``, ``case_num``), official index split."""
    root = require_root(root)
    files = scan_files(root)
    metas = [t for t in table_files(files) if {"case_num", "diagnosis", "derm"} <= table_header(t)]
    if not metas:
        refuse_unread_label_tables(files, r"^meta\.", "the columns case_num, diagnosis, derm")
        raise ConversionError(f"no Derm7pt meta/meta.csv (case_num, diagnosis, derm columns) under {root}")
    meta = metas[0]
    _, records = read_records(meta)
    # meta.csv names images relative to images/; match on the trailing path parts so any unzip depth works.
    by_tail: dict[str, Path] = {}
    for path in files:
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            parts = path.relative_to(root).parts
            for k in range(1, len(parts) + 1):
                by_tail.setdefault("/".join(parts[-k:]).lower(), path)
    split_of_row: dict[int, str] = {}
    for name, split in (("train", "train"), ("valid", "val"), ("test", "test")):
        index_file = meta.parent / f"{name}_indexes.csv"
        if not index_file.is_file():
            continue
        for row in read_table(index_file)[1:]:
            if not row or not row[0].strip().lstrip("-").isdigit():
                continue
            index = int(row[0])
            if not 0 <= index < len(records):
                raise ConversionError(f"{index_file} names row {index}, but {meta} has {len(records)} rows")
            split_of_row[index] = split
    layout = Layout(root)
    found: dict[str, Path] = {}
    row_of: dict[str, int] = {}
    for index, record in enumerate(records):
        derm = record.get("derm", "").strip().replace("\\", "/")
        path = by_tail.get(derm.lower())
        if path is None:
            layout.report.labels_without_images.append(f"row {index} ({derm or 'no derm image'})")
            continue
        found[str(index)] = path
        row_of[str(index)] = index
    ids = unique_ids(found, root, layout.report)
    index_of = {path: row_of[key] for key, path in found.items()}
    skip = {"case_num", "diagnosis", "clinic", "derm", "case_id", "notes"}
    for image_id, path in ids.items():
        index = index_of[path]
        record = records[index]
        layout.add_image(image_id, path, split_of_row.get(index, ""))
        layout.add_label(image_id, clean_value(record.get("diagnosis")) or None, meta, "empty diagnosis")
        layout.groups[image_id] = f"case_{record.get('case_num', '').strip()}"
        values = {("site" if k == "location" else k): v for k, v in record.items() if k not in skip}
        clinic = by_tail.get(record.get("clinic", "").strip().replace("\\", "/").lower())
        values["clinic_path"] = os.path.abspath(clinic) if clinic else ""
        layout.add_metadata(image_id, values)
    classes = sorted({clean_value(r.get("diagnosis")) for r in records} - {""})
    result = layout.finish(classes, "Derm7pt dermoscopic")
    if not split_of_row:
        result.report.notes.append("no meta/{train,valid,test}_indexes.csv found: no official split")
    return result
