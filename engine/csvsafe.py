"""CSV cells a spreadsheet never runs as a formula (OWASP's CSV injection rule), read back as they were written.

Every CSV the project writes holds text a user controls: image ids and paths (``=cmd|' /C calc'!A0.jpg`` is a valid
file name), skip reasons, class names. A spreadsheet runs a cell starting with ``=``, ``+``, ``-``, ``@``, a tab or a
carriage return as a formula; OWASP's rule is to prefix a single quote, so the cell is shown as text. Numbers are
never touched (``-0.5`` stays a number), and a cell that itself starts with a quote gets one more, so ``unescape``
gives back exactly the text written: our own readers (manifests, probability tables, sharded parts) use
``DictReader``, which unescapes, and a real id starting with ``-`` (``-rf``) goes through every stage unchanged.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Mapping
from typing import Any

TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
QUOTE = "'"
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")


def escape(value: Any) -> Any:
    """``value`` as a cell no spreadsheet runs: a text starting with a formula character (or a quote) gets a quote
    in front; numbers, and texts that are plain numbers, are returned as they are."""
    if not isinstance(value, str) or not value.startswith((*TRIGGERS, QUOTE)) or _NUMBER.fullmatch(value):
        return value
    return QUOTE + value


def unescape(value: Any) -> Any:
    """The text ``escape`` was given: one leading quote dropped where ``escape`` put it."""
    if isinstance(value, str) and value.startswith(QUOTE) and value[1:].startswith((*TRIGGERS, QUOTE)):
        return value[1:]
    return value


def escape_row(row: Iterable[Any]) -> list[Any]:
    return [escape(v) for v in row]


class DictWriter(csv.DictWriter):
    """``csv.DictWriter`` whose every cell, the header's included (class names are columns), is escaped."""

    def writerow(self, rowdict: Mapping[str, Any]) -> Any:
        return self.writer.writerow(escape_row(self._dict_to_list(rowdict)))

    def writerows(self, rowdicts: Iterable[Mapping[str, Any]]) -> None:
        for row in rowdicts:
            self.writerow(row)


class Writer:
    """``csv.writer`` whose every cell is escaped."""

    def __init__(self, f: Any, **kwargs: Any) -> None:
        self._writer = csv.writer(f, **kwargs)

    def writerow(self, row: Iterable[Any]) -> Any:
        return self._writer.writerow(escape_row(row))

    def writerows(self, rows: Iterable[Iterable[Any]]) -> None:
        for row in rows:
            self.writerow(row)


class DictReader(csv.DictReader):
    """``csv.DictReader`` that gives back what ``DictWriter`` was given: header and cells unescaped."""

    @property  # type: ignore[override]
    def fieldnames(self) -> list[str] | None:
        names = csv.DictReader.fieldnames.fget(self)  # type: ignore[attr-defined]
        return None if names is None else [unescape(n) for n in names]

    @fieldnames.setter
    def fieldnames(self, value: list[str] | None) -> None:
        csv.DictReader.fieldnames.fset(self, value)  # type: ignore[attr-defined]

    def __next__(self) -> dict[str, Any]:
        row = super().__next__()
        return {k: [unescape(v) for v in cells] if isinstance(cells, list) else unescape(cells)
                for k, cells in row.items()}  # fmt: skip


def reader(f: Any, **kwargs: Any) -> Iterable[list[str]]:
    """``csv.reader`` rows with every cell unescaped."""
    for row in csv.reader(f, **kwargs):
        yield [unescape(v) for v in row]
