"""HAM10000 reader, and the HAM10000 metadata rows (lesion groups, age, sex, site) that ISIC 2018 reuses."""

from __future__ import annotations

from pathlib import Path

from dermpipe.data.formats.layout import (
    ConversionResult,
    Layout,
    clean_value,
    isic_id,
    isic_layout,
    refuse_unread_label_tables,
)
from dermpipe.data.formats.tables import read_records, table_files, table_header

HAM10000_CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


def add_ham_metadata(layout: Layout, record: dict[str, str]) -> str | None:
    """Collect one HAM10000 metadata row (lesion group, age, sex, site, dx_type) into ``layout``; its ISIC id."""
    image_id = isic_id(record.get("image_id") or record.get("image") or "")
    if image_id is None:
        return None
    if lesion := clean_value(record.get("lesion_id")):
        layout.groups.setdefault(image_id, lesion)
    layout.add_metadata(
        image_id,
        {
            "age": record.get("age"),
            "sex": record.get("sex"),
            "site": record.get("localization"),
            "dx_type": record.get("dx_type") or record.get("diagnosis_confirm_type"),
            "dataset": record.get("dataset"),
        },
    )
    return image_id


def read_ham10000(root: Path) -> ConversionResult:
    """HAM10000: ``HAM10000_metadata.csv`` (lesion_id, image_id, dx, ...), optional tschandl lesion masks."""
    layout, files = isic_layout(root)
    found = 0
    for table in table_files(files):
        if not {"image_id", "dx"} <= table_header(table):
            continue
        found += 1
        for record in read_records(table)[1]:
            image_id = add_ham_metadata(layout, record)
            if image_id is None:
                continue
            dx = record.get("dx", "").strip().lower()
            label = dx if dx in HAM10000_CLASSES else None
            layout.add_label(image_id, label, table, f"dx {dx!r} is not one of {','.join(HAM10000_CLASSES)}")
    if not found:
        refuse_unread_label_tables(files, r"metadata", "the columns lesion_id, image_id, dx")
        layout.report.notes.append("no HAM10000_metadata CSV (image_id, dx, lesion_id) found: images unlabelled")
    return layout.finish(HAM10000_CLASSES, "ISIC_*.jpg")
