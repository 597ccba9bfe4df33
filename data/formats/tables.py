"""Label tables as people redistribute them: CSV, tab- or semicolon-separated text (UTF-8, or UTF-16 as Excel's
"Unicode text" writes it) and ``.xlsx`` sheets, read into rows of stripped strings; none is opened unless it is a
regular file."""

from __future__ import annotations

import codecs
import csv
import datetime
import io
import os
import stat
import zipfile
from collections.abc import Iterable
from pathlib import Path

from dermpipe.errors import DermpipeError

TABLE_SUFFIXES: tuple[str, ...] = (".csv", ".tab", ".tsv")
SHEET_SUFFIXES: tuple[str, ...] = (".xlsx", ".xlsm")
_HEAD_BYTES = 1 << 16  # enough of a file to read its first line


class ConversionError(DermpipeError):
    """A dataset layout, class map or option the converter cannot use; the message names the thing and the fix."""


def is_regular(path: Path) -> bool:
    """Whether ``path`` is (a link to) a regular file, by ``os.stat`` alone: a FIFO named ``x.csv`` is never opened."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def decode_text(data: bytes) -> str:
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16", errors="replace")
    return data.decode("utf-8-sig", errors="replace")


def delimiter(text: str) -> str:
    """The separator a table uses: the most frequent of comma, tab and semicolon over its first 20 lines (a sheet
    export starts with title lines that have none), comma when none appears."""
    head = "\n".join(text.split("\n", 20)[:20])
    counts = {d: head.count(d) for d in (",", "\t", ";")}
    best = max(counts, key=lambda d: counts[d])  # ties keep the earlier: comma, then tab
    return best if counts[best] else ","


def _read_bytes(path: Path, limit: int = -1) -> bytes:
    if not is_regular(path):
        what = "does not exist" if not os.path.lexists(path) else "is not a regular file (a pipe, device or bad link)"
        raise ConversionError(f"table {path} {what}: point to the table file itself")
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError as error:
        raise ConversionError(f"cannot read {path}: {error.strerror}") from error


def _cell_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    return str(value).strip()


def read_sheet(path: Path) -> list[list[str]]:
    """The non-blank rows of the first non-empty sheet of an ``.xlsx`` workbook, as text (``1.0`` -> ``1``)."""
    if path.suffix.lower() == ".xls":
        raise ConversionError(f"{path} is an old Excel .xls file: open it and save it as .xlsx or as CSV")
    _read_bytes(path, 0)  # a regular file, readable
    import openpyxl  # only when a workbook is read: the import takes a while
    from openpyxl.utils.exceptions import InvalidFileException

    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
        try:
            for sheet in book.worksheets:
                rows = [[_cell_text(v) for v in values] for values in sheet.iter_rows(values_only=True)]
                rows = [row for row in rows if any(row)]
                if rows:
                    return rows
        finally:
            book.close()
    except (InvalidFileException, zipfile.BadZipFile, KeyError, ValueError, OSError, SyntaxError) as error:
        raise ConversionError(
            f"{path} is not a readable .xlsx workbook: {error} (re-download it, or save the sheet as CSV)"
        ) from None
    return []


def read_table(path: Path) -> list[list[str]]:
    """Rows of a CSV, tab- or semicolon-separated file (the separator is guessed from the first line) or an
    ``.xlsx`` sheet; blank rows skipped, cells stripped."""
    if path.suffix.lower() in (*SHEET_SUFFIXES, ".xls"):
        return read_sheet(path)
    text = decode_text(_read_bytes(path))
    sep = delimiter(text)
    return [[c.strip() for c in row] for row in csv.reader(io.StringIO(text), delimiter=sep) if any(row)]


def read_records(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Lower-cased header and one dict per data row of a table with a header."""
    rows = read_table(path)
    if not rows:
        return [], []
    header = [h.lower() for h in rows[0]]
    return header, [dict(zip(header, row)) for row in rows[1:]]


def table_files(files: Iterable[Path]) -> list[Path]:
    """The regular CSV and tab-separated files among ``files``."""
    return [f for f in files if f.suffix.lower() in TABLE_SUFFIXES and is_regular(f)]


def first_line(path: Path) -> str:
    """A table's first line (empty when unreadable), read from its first 64 KiB only."""
    if not is_regular(path):
        return ""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES)
    except OSError:
        return ""
    return decode_text(head).split("\n", 1)[0].rstrip("\r")


def table_header(path: Path) -> set[str]:
    """The lower-cased column names of a table's first line (empty when unreadable), to tell tables apart."""
    line = first_line(path)
    return {c.strip().strip('"').lower() for c in line.split(delimiter(line))} if line else set()
