"""The documentation holds together: every relative link in the README, docs/ and examples/ reaches a file
(and a heading, for a #anchor), no page points outside the repository, and docs/CONFIG.md is what
`tropd-ds config --list` says today."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "examples").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but hyphens and underscores dropped, spaces to -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # not the comments of code blocks
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.+?)\s*$", text, flags=re.M)}


def test_every_relative_link_reaches_a_file_and_its_heading():
    bad = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{page.relative_to(ROOT)}: {target} (no heading #{anchor})")
            elif ROOT not in dest.parents and dest != ROOT:
                bad.append(f"{page.relative_to(ROOT)}: {target} (outside the repository)")
    assert not bad, "\n".join(bad)


def test_no_page_points_outside_the_repository():
    found = [f"{p.relative_to(ROOT)}" for p in PAGES if "shared/design" in p.read_text()]
    assert not found, found


def test_the_configuration_page_is_current():
    sys.path.insert(0, str(ROOT / "scripts"))
    import config_docs

    assert (ROOT / "docs/CONFIG.md").read_text() == config_docs.render(), "run python scripts/config_docs.py"


def test_the_exit_status_table_is_the_codes_the_commands_return():
    from tropd_ds.exit_codes import ExitCode

    text = (ROOT / "docs/RELIABILITY.md").read_text()
    rows = re.findall(r"^\| (\d+) \| ([A-Z_]+) \|", text, flags=re.M)
    assert {name: int(code) for code, name in rows} == {c.name: c.value for c in ExitCode}
