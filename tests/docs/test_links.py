"""Link checker over README.md and docs/: every relative link and anchor resolves, every path the
text names inside the repository exists, and nothing points outside the repository (the docs must
stand alone for a user of the package)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
IDS = [str(p.relative_to(REPO)) for p in PAGES]
LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
# top-level folders of the repository: a code span starting with one names a file in it
REPO_DIRS = ("docs/", "benchmarks/", "hw_models/", "thermo_kfac/", "tests/", "notebooks/")


def _text_outside_code_blocks(path: Path) -> str:
    return re.sub(r"```.*?```", "", path.read_text(), flags=re.S)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    for line in _text_outside_code_blocks(path).splitlines():
        match = re.match(r"#{1,6} (.+)", line)
        if match:
            slug = _slug(match.group(1))
            anchors.add(slug if slug not in counts else f"{slug}-{counts[slug]}")
            counts[slug] = counts.get(slug, 0) + 1
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_links_and_anchors_resolve_inside_the_repository(page: Path) -> None:
    broken = []
    for target in LINK.findall(_text_outside_code_blocks(page)):
        if "://" in target or target.startswith("mailto:"):
            continue
        file_part, _, anchor = target.partition("#")
        path = (page.parent / file_part).resolve() if file_part else page
        if REPO.resolve() not in path.parents and path != REPO.resolve():
            broken.append(f"{target} (outside the repository)")
        elif not path.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target} (no heading with anchor #{anchor} in {path.name})")
    assert not broken, f"{page.name}: broken links: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_no_reference_to_files_outside_the_repository(page: Path) -> None:
    text = page.read_text()
    outside = re.findall(r"[\w./-]*(?:shared/|research/)[\w./-]*|/work/[\w./-]*|BENCHMARKS\.md", text)
    assert not outside, f"{page.name} refers to files a user of the package does not have: {outside}"


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_repository_paths_named_in_the_text_exist(page: Path) -> None:
    missing = []
    for span in CODE_SPAN.findall(_text_outside_code_blocks(page)):
        path = span.split("::")[0].split(" ")[0].rstrip(".,:;")
        if not path.startswith(REPO_DIRS) or any(c in path for c in "*{}<>[]$"):
            continue
        if not (REPO / path).exists():
            missing.append(path)
    assert not missing, f"{page.name} names repository paths that do not exist: {missing}"


def test_the_checker_catches_what_it_should(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# A title\n\n## Second `part`\n\ntext\n")
    assert _anchors(page) == {"a-title", "second-part"}
    slug = _slug("The seed paper's scenario (`--scenario paper`)")
    assert slug == "the-seed-papers-scenario---scenario-paper"
