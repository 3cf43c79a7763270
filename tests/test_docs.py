"""The documentation: every relative link and #anchor leads somewhere, and the README stays short."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted([README, ROOT / "examples" / "acps_plugin_example" / "README.md", *DOCS.rglob("*.md")])

#: The README lands a newcomer in a minute; the rest belongs in docs/.
README_MAX_CHARS = 10_500

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """The lines outside fenced code blocks, numbered from 1, with inline code spans blanked out."""
    lines, in_code = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            in_code = not in_code
            continue
        if not in_code:
            lines.append((number, CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)))
    return lines


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text, lower case, without punctuation, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors on its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a Markdown page, repeated headings numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    found = set()
    in_code = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
            continue
        match = None if in_code else HEADING.match(line)
        if match:
            slug = github_slug(match.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(page: Path, text: str | None = None) -> list[tuple[int, str]]:
    """``(line, target)`` for every link of a page (its ``text``, read from the file by default) that is not a URL
    with a scheme (``https:``, ``mailto:``)."""
    links = []
    for number, line in prose_lines(page.read_text(encoding="utf-8") if text is None else text):
        for match in LINK.finditer(line):
            target = match.group(1)
            if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
                links.append((number, target))
    return links


def broken_links(page: Path, text: str | None = None) -> list[str]:
    """What is wrong with each relative link of ``page`` (or of ``text`` read as if it were that page), as
    ``page:line: message``."""
    problems = []
    for number, target in relative_links(page, text):
        where = f"{page.relative_to(ROOT)}:{number}: link {target!r}"
        path_part, _, anchor = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        if not destination.is_relative_to(ROOT):
            problems.append(f"{where} leaves the repository")
        elif not destination.exists():
            problems.append(f"{where}: no such file or folder")
        elif anchor:
            if destination.suffix != ".md" or not destination.is_file():
                problems.append(f"{where}: an anchor into something that is not a Markdown page")
            elif anchor not in anchors(destination):
                problems.append(f"{where}: {destination.relative_to(ROOT)} has no heading with anchor #{anchor}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_and_anchor_leads_somewhere(page: Path) -> None:
    assert broken_links(page) == []


def test_the_readme_stays_short() -> None:
    length = len(README.read_text(encoding="utf-8"))
    assert length < README_MAX_CHARS, f"README.md has {length} characters; move detail into docs/"


def test_every_docs_page_is_listed_in_the_index() -> None:
    index = DOCS / "index.md"
    listed = {(index.parent / target.partition("#")[0]).resolve() for _, target in relative_links(index)}
    unlisted = [str(p.relative_to(ROOT)) for p in DOCS.rglob("*.md") if p != index and p.resolve() not in listed]
    assert unlisted == []


def test_ci_runs_the_readmes_test_command() -> None:
    readme = README.read_text(encoding="utf-8")
    ci_command = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert ci_command.endswith("python -m pytest") and f"\n{ci_command}\n" in readme


def test_the_link_checker_finds_a_missing_file_and_a_missing_anchor_but_not_code() -> None:
    page = DOCS / "getting-started.md"
    assert "install" in anchors(page)
    text = "See [a](getting-started.md#no-such-heading), [b](missing.md) and `[c](missing-too.md)`.\n"
    problems = broken_links(DOCS / "probe.md", text)  # read as if it were a page in docs/
    assert len(problems) == 2
    assert "no heading with anchor #no-such-heading" in problems[0] and "no such file" in problems[1]
