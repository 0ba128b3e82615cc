"""The README and docs/ lead somewhere: every link, image, anchor, make target and command they name exists.

Fast and without a server: it reads the Markdown files, the Makefile and Django's command registry.
"""

from __future__ import annotations

import argparse
import re
import unicodedata
from pathlib import Path

import pytest

from tests.conftest import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
SCREENSHOT_LIMIT = 250 * 1024

FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]+`")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def _name(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def prose(text: str) -> str:
    """The text a reader follows links in: code blocks and inline code hold examples, not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def code(text: str) -> list[str]:
    """Every code span and fenced block: where commands are written."""
    return [block.group(0) for block in FENCE.finditer(text)] + INLINE_CODE.findall(FENCE.sub("", text))


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    return LINK.findall(prose(path.read_text(encoding="utf-8")))


def local(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I)  # http:, https:, mailto: leave the repository


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in filter(local, links(path)):
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.is_relative_to(REPO):
            broken.append(f"{target} (outside the repository)")
        elif not linked.exists():
            broken.append(f"{target} (no file {_name(linked)})")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target} (no heading #{anchor} in {_name(linked)})")
    return broken


def test_the_anchor_of_a_heading_is_the_one_github_gives_it():
    assert slug("Failures, Stop, Proceed and Remove") == "failures-stop-proceed-and-remove"
    assert slug("Output (format 2: `docs/output-format.md`)") == "output-format-2-docsoutput-formatmd"
    assert slug("float16 and infinite values") == "float16-and-infinite-values"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_link_and_image_leads_to_a_file_and_heading_that_exist(page):
    assert links(page) or page.name != "README.md", "the README links nothing"
    assert broken_links(page) == [], f"{_name(page)} links to what is not there"


def test_every_page_in_docs_is_linked_from_the_readme():
    linked = {(README.parent / target.partition("#")[0]).resolve() for target in filter(local, links(README))}
    unlinked = [_name(page) for page in DOCS.glob("*.md") if page.resolve() not in linked]
    assert unlinked == [], "pages nobody finds from the README"


def test_every_screenshot_is_shown_in_the_readme_and_small():
    shots = sorted((DOCS / "screenshots").glob("*.png"))
    assert shots, "docs/screenshots/ holds no PNG (make screenshots)"
    shown = {(README.parent / target).resolve() for target in links(README) if target.endswith(".png")}
    assert [_name(shot) for shot in shots if shot.resolve() not in shown] == []
    assert [f"{_name(shot)}: {shot.stat().st_size // 1024} KB" for shot in shots
            if shot.stat().st_size > SCREENSHOT_LIMIT] == []


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", (REPO / "Makefile").read_text(), re.M))


def test_every_make_target_the_docs_name_is_in_the_makefile():
    targets = make_targets()
    named = {(_name(page), target) for page in PAGES for snippet in code(page.read_text(encoding="utf-8"))
             for target in re.findall(r"(?:^|[\s`])make ([a-z][\w-]*)", snippet, re.M)}
    assert {"run", "test"} <= {target for _, target in named}
    assert sorted(f"{page}: make {target}" for page, target in named if target not in targets) == []


def _subcommands(name: str) -> set[str] | None:
    """A command's subcommand names (`extraction export`), or None when it takes none."""
    from django.core.management import get_commands, load_command_class

    parser = load_command_class(get_commands()[name], name).create_parser("manage.py", name)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return None


def test_every_manage_py_command_the_docs_name_exists():
    from django.core.management import get_commands

    commands = get_commands()
    named = {(_name(page), match) for page in PAGES for snippet in code(page.read_text(encoding="utf-8"))
             for match in re.findall(r"manage\.py ([a-z_]+)(?: ([a-z][a-z_-]*))?", snippet)}
    assert named, "the docs name no manage.py command"
    wrong = []
    for page, (command, word) in sorted(named):
        if command not in commands:
            wrong.append(f"{page}: manage.py {command} (no such command)")
            continue
        choices = _subcommands(command)
        if choices is not None and word not in choices:
            wrong.append(f"{page}: manage.py {command} {word} (its subcommands: {', '.join(sorted(choices))})")
    assert wrong == []
