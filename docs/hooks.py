"""mkdocs hook: the API reference reads ``dermpipe.<stage>`` where the installed package has it.

setup.cfg's ``package_dir`` installs the stage folders beside ``dermpipe/`` as its subpackages (``segmentation/`` is
``dermpipe.segmentation``); mkdocstrings reads source folders as they lie, so it would find a ``dermpipe`` without
them. Before the pages render, this links the installed layout into a temporary folder (tools/staged_layout.py, as
for import-linter) and points the Python handler's ``paths`` there. Nothing is written in the source tree.

``CommentDocstrings`` (a griffe extension, named in mkdocs.yml) shows a config field's comment as its description:
the stage configs document each field in a comment on its line, or in comment lines just above it.
"""

from __future__ import annotations

import io
import re
import shutil
import sys
import tempfile
import tokenize
from pathlib import Path
from typing import Any

import griffe
from mkdocs.plugins import event_priority

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from staged_layout import stage_layout  # noqa: E402

_staged: list[Path] = []


@event_priority(100)  # before mkdocstrings' own on_config, which may start the handler
def on_config(config: Any, **kwargs: Any) -> Any:
    staged = stage_layout(Path(tempfile.mkdtemp(prefix="dermpipe-docs-")))
    _staged.append(staged)
    python = config.plugins["mkdocstrings"].config.handlers.setdefault("python", {})
    python["paths"] = [str(staged)]
    return config


def on_shutdown(**kwargs: Any) -> None:
    while _staged:
        shutil.rmtree(_staged.pop(), ignore_errors=True)  # the links only: rmtree never follows them


def _comment(line: str) -> str:
    """The comment at the end of one source line ('' when none; a ``#`` inside a string is not one)."""
    found = ""
    try:
        for token in tokenize.generate_tokens(io.StringIO(line).readline):
            if token.type == tokenize.COMMENT:
                found = token.string.lstrip("#").strip()
    except (tokenize.TokenError, SyntaxError):  # a line that opens a bracket it does not close
        pass
    return "" if found == "fmt: skip" else found


def _plain(text: str) -> str:
    """A comment as Markdown that shows it as written: ``<root>``, ``> 0`` and ``*`` are no markup (code spans kept)."""
    parts = re.split(r"(`[^`]*`)", text)
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*")
    return "".join(parts)


class CommentDocstrings(griffe.Extension):
    """An attribute without a docstring takes the comment lines just above it and the comment ending its line."""

    def on_attribute_instance(self, *, attr: griffe.Attribute, **kwargs: Any) -> None:
        if attr.docstring is not None or not attr.lineno:
            return
        try:
            lines = attr.lines_collection[attr.filepath]
        except (KeyError, TypeError):
            return
        above = []
        number = attr.lineno - 1  # the line above, 1-based
        while number >= 1 and lines[number - 1].strip().startswith("#"):
            above.insert(0, lines[number - 1].strip().lstrip("#").strip())
            number -= 1
        last = attr.endlineno or attr.lineno
        own = [_comment(lines[attr.lineno - 1])] + ([_comment(lines[last - 1])] if last != attr.lineno else [])
        text = " ".join(part for part in [*above, *own] if part)
        if text:
            attr.docstring = griffe.Docstring(_plain(text), parent=attr)
