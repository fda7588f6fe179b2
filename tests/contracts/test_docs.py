"""The README is the front door; the documentation is the MkDocs site in docs/ (mkdocs.yml).

scripts/test.sh builds the site with ``mkdocs build --strict`` (broken links and anchors fail
there); these tests check what the build does not: the README's size and first commands, that
every page is in the nav, and that the pages speak of the project, not of its tracker.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
MAX_README_LINES = 150

# "issue 23", "issues #4", "PR 12", "ticket #7", or a bare "#23" (not a Markdown anchor such as
# `page.md#6-data-versioning`, which follows a word character or is followed by a hyphen)
ISSUE_REFERENCE = re.compile(
    r"\b(?:issues?|tickets?|PRs?|pull requests?|bugs?)\s*#?\d+\b|(?<![\w&/.#])#\d+(?![\w-])",
    re.IGNORECASE,
)


def _nav_pages(nav: list) -> list[str]:
    pages: list[str] = []
    for entry in nav:
        items = entry.values() if isinstance(entry, dict) else [entry]
        for item in items:
            pages.extend(_nav_pages(item) if isinstance(item, list) else [item])
    return pages


def _documents() -> list[Path]:
    return [README, *sorted(DOCS.glob("**/*.md"))]


def test_readme_is_a_front_door_of_at_most_150_lines() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines (at most {MAX_README_LINES}): move the detail into a "
        "page of docs/"
    )
    # its first lines give the main command and the test command
    first_block = README.read_text().split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert [line.split()[:2] for line in first_block] == [
        ["bash", "scripts/run_pipeline.sh"],
        ["bash", "scripts/test.sh"],
    ]
    assert README.read_text().index("```bash") < 200


def test_every_docs_page_is_in_the_nav() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config.get("docs_dir", "docs") == "docs"
    nav = _nav_pages(config["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.glob("**/*.md"))
    assert [p for p in pages if p not in nav] == [], "pages missing from mkdocs.yml's nav"
    assert [p for p in nav if not (DOCS / p).is_file()] == [], "nav entries without a page"
    assert len(nav) == len(set(nav)), "a page is listed twice"


def test_readme_links_every_docs_page() -> None:
    readme = README.read_text()
    linked = set(re.findall(r"\]\((docs/[^)#\s]+\.md)", readme))
    pages = {f"docs/{p.relative_to(DOCS)}" for p in DOCS.glob("**/*.md")}
    assert sorted(pages - linked) == []
    assert sorted(p for p in linked if not (ROOT / p).is_file()) == []


@pytest.mark.parametrize("path", _documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_issue_number_references(path: Path) -> None:
    found = [
        f"{path.relative_to(ROOT)}:{n}: {m.group(0)!r}"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        for m in ISSUE_REFERENCE.finditer(line)
    ]
    assert found == [], "the docs speak of the project, not of its tracker"


@pytest.mark.parametrize(
    ("text", "is_reference"),
    [
        ("as issue 23 asked", True),
        ("see #23 for the history", True),
        ("fixed in (#7)", True),
        ("Issues #4 and 5", True),
        ("[Data versioning](datasets.md#6-data-versioning)", False),
        ("a raw `@`, `/`, `#`)", False),
        ("2 grades, 23 eyes", False),
        ("&#8212; an entity", False),
    ],
)
def test_issue_reference_pattern(text: str, is_reference: bool) -> None:
    assert bool(ISSUE_REFERENCE.search(text)) is is_reference
