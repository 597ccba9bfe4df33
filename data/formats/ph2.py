"""PH2 reader: IMDxxx images and lesion masks; labels and criteria from the PH2 table as published or redistributed.

The table comes as ``PH2_dataset.txt`` (``||``-separated columns, the six criteria ``|``-separated, a legend below),
as the ``PH2_dataset.xlsx`` sheet (title rows, then ``Image Name``, ``Histological Diagnosis``, an ``X`` under one of
``Common Nevus``/``Atypical Nevus``/``Melanoma``, the criteria, an ``X`` per colour), or as a CSV or tab-separated
export of either. A table that is none of these fails with one error naming it.
"""

from __future__ import annotations

import re
from pathlib import Path

from dermpipe.data.formats.layout import ConversionError, ConversionResult, Layout, require_root, scan_files
from dermpipe.data.formats.tables import SHEET_SUFFIXES, TABLE_SUFFIXES, decode_text, is_regular, read_table

PH2_CLASSES: tuple[str, ...] = ("common_nevus", "atypical_nevus", "melanoma")
_PH2_IMAGE = re.compile(r"^(IMD\d+)\.(?:bmp|png|jpe?g|tiff?)$", re.IGNORECASE)
_PH2_MASK = re.compile(r"^(IMD\d+)_lesion\.(?:bmp|png|tiff?)$", re.IGNORECASE)
_PH2_NAME = re.compile(r"IMD\d+", re.IGNORECASE)
_PH2_CRITERIA = ("asymmetry", "pigment_network", "dots_globules", "streaks", "regression_areas", "blue_whitish_veil")
# The legend's colour codes; the sheet marks each colour with an X in its own column instead.
_PH2_COLOURS = ("white", "red", "light_brown", "dark_brown", "blue_gray", "black")
_NAME_COLUMNS = ("name", "image_name", "image", "image_id")
_UNMARKED = {"", "0", "no", "false", "-"}
_TABLE_KINDS = (*TABLE_SUFFIXES, *SHEET_SUFFIXES, ".txt", ".xls")


def _key(cell: str) -> str:
    """A header cell as a key: ``'Pigment Network\\n(AT/T)'`` -> ``pigment_network``, ``Blue-Gray`` -> ``blue_gray``."""
    words = re.sub(r"\(.*?\)", " ", cell.split("\n")[0]).lower()
    return "_".join(re.findall(r"[a-z0-9]+", words.replace("colours", "colors")))


def _pipe_rows(text: str) -> list[list[str]]:
    """Rows of the ``||`` text table: columns split on ``||``, the criteria group on ``|``; other lines as one cell."""
    rows = []
    for line in text.splitlines():
        inner = line.strip().strip("|")
        rows.append([c.strip() for group in inner.split("||") for c in group.split("|")] if "||" in line else [inner])
    return rows


def _rows(table: Path) -> list[list[str]]:
    if table.suffix.lower() == ".txt" and is_regular(table):
        text = decode_text(table.read_bytes())
        if "||" in text:
            return _pipe_rows(text)
    return read_table(table)  # CSV, tab-separated (a .txt export, too), .xlsx; refuses an .xls


def _cell(row: list[str], columns: dict[str, int], key: str) -> str:
    return row[columns[key]] if key in columns and columns[key] < len(row) else ""


def _header(rows: list[list[str]]) -> dict[str, int] | None:
    """The column of each key, from the first header row with a name column and a diagnosis; a second header row
    below it (the sheet's ``Common Nevus`` ... under a merged ``Clinical Diagnosis``) adds its columns."""
    for index, row in enumerate(rows[:60]):
        columns: dict[str, int] = {}
        for column, cell in enumerate(row):
            columns.setdefault(_key(cell), column)
        if not any(name in columns for name in _NAME_COLUMNS):
            continue  # the name column heads the header row itself
        below = rows[index + 1] if index + 1 < len(rows) else []
        if not any(_PH2_NAME.fullmatch(cell) for cell in below):
            for column, cell in enumerate(below):
                columns.setdefault(_key(cell), column)
        if "clinical_diagnosis" in columns or set(PH2_CLASSES) <= set(columns):
            return columns
    return None


def _label(row: list[str], columns: dict[str, int]) -> tuple[str | None, str]:
    if set(PH2_CLASSES) <= set(columns):  # the sheet: an X under one of the three
        marked = [c for c in PH2_CLASSES if _cell(row, columns, c).lower() not in _UNMARKED]
        return (marked[0] if len(marked) == 1 else None), f"{len(marked)} marks among Common/Atypical Nevus, Melanoma"
    value = _cell(row, columns, "clinical_diagnosis")
    code = value[:-2] if value.endswith(".0") else value
    by_name = {c.replace("_", " "): c for c in PH2_CLASSES}
    label = dict(zip("012", PH2_CLASSES)).get(code) or by_name.get(" ".join(value.lower().split()))
    return label, f"clinical diagnosis {value!r} is not 0, 1 or 2"


def _read_table(table: Path, layout: Layout) -> int:
    """Add the labels and criteria of one PH2 table to ``layout``; the number of IMDxxx rows read."""
    rows = _rows(table)
    columns = _header(rows)
    if columns is None:
        raise ConversionError(
            f"{table}: no PH2 header row (a Name or Image Name column with Clinical Diagnosis, or with Common Nevus, "
            "Atypical Nevus and Melanoma columns): is it PH2_dataset.txt/.xlsx as published, or a CSV export of it?"
        )
    name_column = next(columns[n] for n in _NAME_COLUMNS if n in columns)
    n = 0
    for row in rows:
        name = row[name_column] if name_column < len(row) else ""
        if not _PH2_NAME.fullmatch(name):
            continue  # title, header, legend and blank lines
        n += 1
        label, problem = _label(row, columns)
        layout.add_label(name, label, table, problem)
        values: dict[str, str | None] = {"histology": _cell(row, columns, "histological_diagnosis")}
        values |= {key: _cell(row, columns, key) for key in _PH2_CRITERIA}
        if "colors" in columns:
            values["colors"] = " ".join(_cell(row, columns, "colors").split())
        else:  # the sheet's X per colour -> the legend's codes, as the text table writes them
            marked = [str(k) for k, c in enumerate(_PH2_COLOURS, 1) if _cell(row, columns, c).lower() not in _UNMARKED]
            values["colors"] = " ".join(marked)
        layout.add_metadata(name, values)
    if not n:
        raise ConversionError(f"{table}: a PH2 header but no IMDxxx rows: is the table complete?")
    return n


def read_ph2(root: Path) -> ConversionResult:
    """PH2: images, ``*_lesion`` masks, and the PH2 table (``.txt``, ``.xlsx``, CSV or tab-separated export)."""
    root = require_root(root)
    files = scan_files(root)
    layout = Layout(root)
    for path in files:
        if mask := _PH2_MASK.match(path.name):
            layout.add_mask(mask.group(1), path)
        elif image := _PH2_IMAGE.match(path.name):
            layout.add_image(image.group(1), path)
    named = [f for f in files if "ph2" in f.name.lower() and "readme" not in f.name.lower()]
    tables = [f for f in named if f.suffix.lower() in _TABLE_KINDS]
    for table in tables:
        _read_table(table, layout)
    if not tables:
        layout.report.notes.append("no PH2_dataset table (.txt, .xlsx, .csv) found: images unlabelled")
    return layout.finish(PH2_CLASSES, "PH2 IMDxxx.bmp")
