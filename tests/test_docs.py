"""The documentation's links resolve, and the README stays a short front page.

Every relative link and image of README.md, docs/*.md, baselines/README.md and results/gpu/README.md
must name a file or folder of the repository, and every `#anchor` (in the same page or another
Markdown page) must be a heading of that page, spelled as GitHub spells heading anchors.
"""
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "baselines" / "README.md", ROOT / "results" / "gpu" / "README.md",
                *(ROOT / "docs").glob("*.md")])

#: the README's two commands, byte for byte (CI runs the second one as the README writes it)
QUICK_START = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints-cpu.txt -e . && snakemake --cores all",
    "python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints-cpu.txt -e '.[test]' && pytest",
)

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def prose(text: str) -> str:
    """The page without fenced code blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.M | re.S)
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", text, flags=re.S)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a Markdown page's headings: lower case, punctuation dropped, spaces as
    hyphens, a repeated one suffixed -1, -2, …"""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", page.read_text(), flags=re.M | re.S)
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.M):
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(page: Path) -> list[str]:
    return [target for target in LINK.findall(prose(page.read_text()))
            if not re.match(r"[a-z][a-z0-9+.-]*:", target, re.I)]  # http:, https:, mailto: are not checked


def test_the_pages_exist():
    names = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert {"testbed.md", "methods.md", "plugins.md", "uncertainty.md", "reproducibility.md", "latency.md",
            "paper-scale.md", "workflow.md", "command-line.md", "architecture.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page):
    assert page.is_file(), page
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / unquote(path)).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif ROOT not in dest.parents and dest != ROOT:
            broken.append(f"{target}: outside the repository")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    readme = set(links(ROOT / "README.md"))
    missing = [p.name for p in (ROOT / "docs").glob("*.md") if f"docs/{p.name}" not in {t.partition("#")[0] for t in readme}]
    assert not missing, f"README.md links no docs page {missing}"


def test_readme_is_a_short_front_page_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 220, f"README.md has {len(readme.splitlines())} lines (at most 220)"
    lines = readme.splitlines()
    for command in QUICK_START:
        assert command in lines, f"README.md lacks the line {command!r}"
    ci = [line for line in lines if re.match(r"^python3 -m venv \.venv .*&& pytest", line)]
    assert ci[:1] == [QUICK_START[1]], "CI's grep for the test command must find the README's test command first"


def test_docs_name_no_file_outside_the_repository():
    for page in PAGES:
        assert "../shared" not in page.read_text(), page
        for target in links(page):
            path = target.partition("#")[0]
            if path:
                dest = (page.parent / unquote(path)).resolve()
                assert dest == ROOT or ROOT in dest.parents, f"{page.relative_to(ROOT)}: {target}"


def test_the_checker_finds_a_broken_link_and_anchor(tmp_path):
    """The checks above can fail: a planted missing file and a planted missing anchor are found."""
    page = tmp_path / "page.md"
    page.write_text("# A title, with `code`\n\n## Same\n\n## Same\n\n[a](missing.md) [b](#nope) [c](#a-title-with-code)"
                    " [d](#same-1) `[e](inline.md)`\n\n```\n[f](fenced.md)\n```\n[g](https://example.org)\n")
    assert links(page) == ["missing.md", "#nope", "#a-title-with-code", "#same-1"]
    assert anchors(page) == {"a-title-with-code", "same", "same-1"}
