"""The README and docs/: the README fits a screen or two, every relative link lands, every page
leads back to the README, and the generated parts (the API reference, the settings) match the
code they are made from."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import gen_docs
import pytest

from juturna_operator import api, settings

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
PAGES = sorted((REPO / "docs").glob("*.md"))
# Reports a run writes whole (their generators own their wording); every other page is prose.
REPORTS = {"benchmarks.md", "benchmarks-live.md", "benchmarks-pods.md", "benchmarks-shard.md"}
REPORTS |= {"benchmarks-swap.md"}
REPORTS |= {"reliability.md"}
README_LIMIT = 8 * 1024

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _prose(text: str) -> str:
    """The text without its code: fenced blocks and inline code spans."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lowercased, punctuation dropped, spaces
    turned into '-', and '-1', '-2' ... after repeats."""
    seen: Counter[str] = Counter()
    anchors = set()
    for line in FENCE.sub("", text).splitlines():
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading[1]).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        anchors.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
        seen[slug] += 1
    return anchors


def _links(page: Path) -> list[str]:
    return LINK.findall(_prose(page.read_text()))


def test_the_readme_fits_in_8_kib() -> None:
    size = len(README.read_bytes())
    assert size <= README_LIMIT, (
        f"README.md is {size} bytes, over {README_LIMIT}: move the detail to a page of docs/"
    )


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves_to_a_file_and_an_anchor(page: Path) -> None:
    broken = []
    for target in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in _anchors(dest.read_text())):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_the_link_check_sees_links_headings_and_code() -> None:
    """What the check above reads: a broken link would otherwise pass unseen."""
    text = (
        "# The Pipeline API (`juturna.io/v1alpha1`)\n## Runtimes (engine `service`)\n"
        "## Runtimes (engine `service`)\n"
        "See [a](x.md#y), ![img](p.png) and [`code` text](../z.md).\n"
        "`[not](a-link.md)`\n```\n# not a heading\n[not](a-link.md)\n```\n"
    )
    assert _anchors(text) == {
        "the-pipeline-api-juturnaiov1alpha1",
        "runtimes-engine-service",
        "runtimes-engine-service-1",
    }
    assert LINK.findall(_prose(text)) == ["x.md#y", "p.png", "../z.md"]


@pytest.mark.parametrize("page", [p for p in PAGES if p.name not in REPORTS], ids=lambda p: p.name)
def test_every_doc_page_links_back_to_the_readme(page: Path) -> None:
    assert "../README.md" in _links(page), f"docs/{page.name} has no link back to ../README.md"


# Wording that speaks to the project's own developers, not to a user.
IN_HOUSE = re.compile(
    r"\b(?:our|ours|we)\b|\bround \d+\b|\bissue \d+'s\b|\bthese machines\b|\bthe team\b", re.I
)


@pytest.mark.parametrize(
    "page",
    [README, *(p for p in PAGES if p.name not in REPORTS)],
    ids=lambda p: p.relative_to(REPO).as_posix(),
)
def test_pages_speak_to_users(page: Path) -> None:
    found = sorted({m[0] for m in IN_HOUSE.finditer(_prose(page.read_text()))})
    assert not found, f"{page.name} has in-house wording: {found}"


@pytest.mark.parametrize("part", sorted(gen_docs.PARTS))
def test_the_generated_parts_of_the_docs_are_current(part: str) -> None:
    page, text = gen_docs.expected(part)
    assert page.read_text() == text, (
        f"docs/{page.name} is out of date with the code it is made from: run `make docs`"
    )


def test_a_page_without_its_markers_is_refused() -> None:
    with pytest.raises(ValueError, match="no single <!-- BEGIN GENERATED: api -->"):
        gen_docs.splice("# a page\n", "api", "| table |\n")


def test_the_api_reference_lists_every_field_of_every_type() -> None:
    reference = gen_docs.api_reference()
    for root in (api.PipelineSpec, api.PipelineStatus):
        for name, schema in gen_docs._types_of(root):
            section = reference.split(f"\n### {name}\n", 1)[1].split("\n### ", 1)[0]
            for field in schema.get("properties", {}):
                assert f"| `{field}` |" in section, f"{name}.{field} is not in the reference"
            for value in schema.get("enum", []):
                assert f"`{value}`" in section, f"{name} value {value} is not in the reference"


def test_the_settings_table_lists_every_setting_with_its_flag_and_variable() -> None:
    """``settings.SETTINGS`` is the one list the operator reads (an unlisted name is a
    ``KeyError`` in ``_Sources``); the page lists each, by variable and flag."""
    table = gen_docs.settings_reference()
    for setting in settings.SETTINGS:
        assert f"| `{setting.env}` | `{setting.flag}` |" in table, setting.env
