"""The README starts short and points into docs/: every file a document links to exists, and every document in
docs/ is linked from the README."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "model_store" / "README.md",
             REPO / "bench" / "RESULTS.md"]
# [text](target), the target up to the first space or closing parenthesis
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
README_MAX_LINES = 150  # what a newcomer reads before the links; the depth goes into docs/


def local_links(document: Path) -> list[str]:
    return [target for target in LINK.findall(document.read_text())
            if not re.match(r"^[a-z]+:", target) and not target.startswith("#")]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(REPO)))
def test_every_linked_file_exists(document: Path) -> None:
    missing = [target for target in local_links(document)
               if not (document.parent / target.split("#")[0]).exists()]
    assert missing == [], f"{document.relative_to(REPO)} links to files that are not there: {missing}"


def test_the_readme_links_every_document_in_docs_and_stays_short() -> None:
    readme = REPO / "README.md"
    linked = {(REPO / target.split("#")[0]).resolve() for target in local_links(readme)}
    unlinked = [path.name for path in DOCUMENTS[1:-2] if path.resolve() not in linked]
    assert unlinked == [], f"docs/ files the README does not link: {unlinked}"
    lines = len(readme.read_text().splitlines())
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines: keep it a short start and put the depth in a "
                                       "file of docs/, linked from its 'Read more'")
