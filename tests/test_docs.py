"""The README and docs/*.md: every relative link names a file that exists, and every
``#anchor`` a heading of the page it points into (as GitHub renders them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped (word
    characters, hyphens and spaces kept), spaces as hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a markdown page's headings (repeats get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    found = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(page: Path) -> list[str]:
    """The link targets of a page, outside code blocks and inline code."""
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", page.read_text()))
    return LINK.findall(text)


def test_slug_matches_github() -> None:
    assert slug("What the smoke run shows: the mini-world") == (
        "what-the-smoke-run-shows-the-mini-world"
    )
    assert slug("The `icd` command") == "the-icd-command"
    assert (
        slug("Serving a teacher with vLLM (or SGLang)") == "serving-a-teacher-with-vllm-or-sglang"
    )
    assert slug("The method, and where each part lives") == "the-method-and-where-each-part-lives"


def test_the_checks_catch_broken_links(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text("# Top\n\n[a](#top) [b](missing.md) ![c](p.md#nope)\n```\n[d](gone.md)\n```\n")
    assert links(page) == ["#top", "missing.md", "p.md#nope"]
    assert anchors(page) == {"top"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no heading #{anchor})")
    assert not broken, f"{page.relative_to(REPO)}: " + ", ".join(broken)


def test_readme_has_a_table_of_contents_of_its_sections() -> None:
    readme = REPO / "README.md"
    sections = {slug(h) for h in re.findall(r"(?m)^## (.*)$", FENCE.sub("", readme.read_text()))}
    linked = {t[1:] for t in links(readme) if t.startswith("#")}
    assert sections <= linked, sections - linked
