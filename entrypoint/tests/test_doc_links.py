"""Every relative link in README.md and docs/*.md reaches a file, and every #anchor a heading of its page.

Anchors are GitHub's heading slugs: the heading's text, lower-cased, with everything but letters, digits, spaces,
hyphens and underscores removed and each space turned into a hyphen; a repeated slug gets -1, -2, ... appended.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
DOCS_PAGES = {"policies", "operations", "deploy-aws", "performance", "security", "troubleshooting", "architecture"}

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"(?<!!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans blanked (a link in code is not a link)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(re.sub(r"`[^`]*`", "``", line))
    return lines


def slug(heading: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    seen: Counter[str] = Counter()
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if match:
            base = slug(match.group(2))
            found.add(base if seen[base] == 0 else f"{base}-{seen[base]}")
            seen[base] += 1
    return found


def links(page: Path) -> list[str]:
    return [target for line in prose_lines(page.read_text(encoding="utf-8")) for target in LINK.findall(line)]


def test_slugs_follow_github() -> None:
    assert slug("Troubleshooting: \"cannot connect to proxy\"") == "troubleshooting-cannot-connect-to-proxy"
    assert slug("Policies: per-client lists, deny rules, report mode") == (
        "policies-per-client-lists-deny-rules-report-mode")
    assert slug("Learning the list from traffic: `egress-proxy allowlist suggest`") == (
        "learning-the-list-from-traffic-egress-proxy-allowlist-suggest")
    assert slug("Task size and count for 1, 10 and 50 Gbit/s") == "task-size-and-count-for-1-10-and-50-gbits"
    assert slug("`docker compose down` says the network is \"still in use\"") == (
        "docker-compose-down-says-the-network-is-still-in-use")


def test_link_parser_sees_links_and_skips_code(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("See [a](docs/a.md#x) and [b **c**](#y).\n`[not](code.md)`\n```\n[no](fence.md)\n```\n"
                    "![image](img.png)\n", encoding="utf-8")
    assert links(page) == ["docs/a.md#x", "#y"]


def test_the_docs_pages_are_the_agreed_ones() -> None:
    assert {page.stem for page in PAGES if page.parent.name == "docs"} == DOCS_PAGES


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: are not checked here
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / unquote(path_part)).resolve() if path_part else page
        if not dest.exists():
            broken.append(f"{target}: {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest} does not exist")
            continue
        if anchor and dest.suffix == ".md" and unquote(anchor) not in anchors(dest):
            broken.append(f"{target}: no heading in {dest.relative_to(REPO)} has the anchor #{anchor}")
    assert not broken, f"{page.relative_to(REPO)}: broken links:\n" + "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {Path(target.partition("#")[0]).stem for target in links(REPO / "README.md")
              if target.startswith("docs/")}
    assert DOCS_PAGES <= linked
