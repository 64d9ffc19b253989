"""The README stays an overview: short, with links that resolve."""

from __future__ import annotations

import re

from tests.docs.snippets import ROOT

README = ROOT / "README.md"


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= 200, f"README.md has {lines} lines; move the details to a page of docs/"


def test_readme_links_resolve():
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [t for t in targets if not re.match(r"[a-z]+://", t) and not t.startswith("#")]
    assert local
    for target in local:
        assert (ROOT / target.split("#")[0]).exists(), f"README.md links to a missing file: {target}"


def test_the_sections_the_site_includes_are_marked():
    text = README.read_text(encoding="utf-8")
    for name in ("install", "commands", "usage"):
        start, end = f"--8<-- [start:{name}]", f"--8<-- [end:{name}]"
        assert text.count(start) == 1 and text.count(end) == 1 and text.index(start) < text.index(end), name
