"""The README stays a first screen and the documentation under docs/ stays whole: sizes, links, the nav, and the
blocks the README shares with the pages (its quick start, run by tests/test_quickstart.py; its results table)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md"))
MKDOCS = Path(sys.executable).parent / "mkdocs"

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _section(text: str, heading: str) -> str:
    """The text under ``heading`` (a whole line such as ``## Results``) up to the next heading of its level or above;
    a ``#`` line inside a code block is no heading."""
    level = len(heading.split(" ", 1)[0])
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.rstrip("\n") == heading)
    inside = False
    for end in range(start + 1, len(lines)):
        if lines[end].startswith("```"):
            inside = not inside
        elif not inside and re.match(rf"#{{1,{level}}} ", lines[end]):
            break
    else:
        end = len(lines)
    return "".join(lines[start:end])


def _first_block(text: str) -> str:
    return re.search(r"```\n(.*?)```", text, re.S).group(1)


def _anchors(text: str) -> set[str]:
    """The ids mkdocs gives the page's headings (the toc extension's default slugify), outside code blocks."""
    ids = set()
    for line in FENCE.sub("", text).splitlines():
        if re.match(r"#{1,6} ", line):
            title = re.sub(r"[`*]", "", line.lstrip("#").strip())
            ids.add(re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", title).strip().lower()))
    return ids


def _links(path: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", path.read_text(encoding="utf-8")))


def _nav_pages(nav: list) -> list[str]:
    found = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        found += _nav_pages(value) if isinstance(value, list) else [value]
    return found


def test_the_readme_is_at_most_150_lines_with_a_quick_start_of_at_most_15() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    block = _first_block(_section(text, "## Quick start"))
    assert len(block.splitlines()) <= 15
    for needed in ("make demo", "make test", "## Results", "Research software, not a medical device.", "licences"):
        assert needed in text, needed


def test_the_readme_quick_start_is_the_docs_quick_start() -> None:
    """tests/test_quickstart.py runs docs/quickstart.md's first block; the README shows the same lines."""
    readme = _first_block(_section(README.read_text(encoding="utf-8"), "## Quick start"))
    assert readme == _first_block((DOCS / "quickstart.md").read_text(encoding="utf-8"))


def test_the_results_on_the_home_page_are_the_readme_results() -> None:
    readme = _section(README.read_text(encoding="utf-8"), "## Results")
    assert readme == _section((DOCS / "index.md").read_text(encoding="utf-8"), "## Results")


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_points_at_a_file_and_heading_that_exist(path: Path) -> None:
    broken = []
    for link in _links(path):
        if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        if not file.is_file():
            broken.append(f"{link}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text(encoding="utf-8")):
            broken.append(f"{link}: no heading #{anchor} in {file.relative_to(REPO)}")
        elif path.parent == DOCS and not file.is_relative_to(DOCS):
            broken.append(f"{link}: outside docs/, the site cannot link it")
    assert broken == [], broken


def test_every_page_is_in_the_nav_and_every_nav_entry_is_a_page() -> None:
    config = yaml.load((REPO / "mkdocs.yml").read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
    assert config["docs_dir"] == "docs"
    nav = _nav_pages(config["nav"])
    assert sorted(nav) == sorted(p.name for p in PAGES)
    assert len(nav) == len(set(nav))


def test_the_readme_links_every_page() -> None:
    linked = {link.partition("#")[0] for link in _links(README)}
    assert {f"docs/{p.name}" for p in PAGES if p.name != "index.md"} <= linked


@pytest.mark.skipif(not MKDOCS.exists(), reason="mkdocs is not installed (pip install -e '.[dev]')")
def test_the_site_builds_without_a_warning(tmp_path: Path) -> None:
    """`make docs` in a temporary folder: mkdocs build --strict fails on any warning (a broken link, a missing page,
    an API name the reference cannot resolve). About 5 seconds."""
    done = subprocess.run(
        [str(MKDOCS), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert (tmp_path / "site" / "api" / "index.html").is_file()
    assert "DermpipeError" in (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert (tmp_path / "site" / "serve_page.png").is_file()
    shutil.rmtree(tmp_path / "site")
