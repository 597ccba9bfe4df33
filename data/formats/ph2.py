"""PH2 reader: IMDxxx images and lesion masks, labels and criteria from the '||' table ``PH2_dataset.txt``."""

from __future__ import annotations

import re
from pathlib import Path

from dermpipe.data.formats.layout import ConversionResult, Layout, require_root, scan_files

PH2_CLASSES: tuple[str, ...] = ("common_nevus", "atypical_nevus", "melanoma")
_PH2_IMAGE = re.compile(r"^(IMD\d+)\.(?:bmp|png|jpe?g|tiff?)$", re.IGNORECASE)
_PH2_MASK = re.compile(r"^(IMD\d+)_lesion\.(?:bmp|png|tiff?)$", re.IGNORECASE)
_PH2_CRITERIA = ("asymmetry", "pigment_network", "dots_globules", "streaks", "regression_areas", "blue_whitish_veil")


def read_ph2(root: Path) -> ConversionResult:
    """PH2: ``PH2_dataset.txt``, a '||' table of Name, Histological and Clinical Diagnosis (0/1/2), criteria, colors."""
    root = require_root(root)
    files = scan_files(root)
    layout = Layout(root)
    for path in files:
        if mask := _PH2_MASK.match(path.name):
            layout.add_mask(mask.group(1), path)
        elif image := _PH2_IMAGE.match(path.name):
            layout.add_image(image.group(1), path)
    tables = [f for f in files if f.suffix.lower() == ".txt" and "ph2" in f.name.lower()]
    for table in tables:
        for line in table.read_text(encoding="utf-8", errors="replace").splitlines():
            cells = [c.strip() for c in line.split("||")]
            if len(cells) < 4 or not re.fullmatch(r"IMD\d+", cells[1]):
                continue  # header, legend and blank lines
            image_id, histology, clinical = cells[1], cells[2], cells[3]
            label = dict(enumerate(PH2_CLASSES)).get(int(clinical)) if clinical.isdigit() else None
            layout.add_label(image_id, label, table, f"clinical diagnosis {clinical!r} is not 0, 1 or 2")
            values: dict[str, str | None] = {"histology": histology}
            criteria = [c.strip() for c in cells[4].split("|")] if len(cells) > 4 else []
            if len(criteria) == len(_PH2_CRITERIA):
                values |= dict(zip(_PH2_CRITERIA, criteria))
            if len(cells) > 5:
                values["colors"] = " ".join(cells[5].split())
            layout.add_metadata(image_id, values)
    if not tables:
        layout.report.notes.append("no PH2_dataset.txt found: images unlabelled")
    return layout.finish(PH2_CLASSES, "PH2 IMDxxx.bmp")
