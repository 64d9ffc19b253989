"""CHANGELOG.md follows Keep a Changelog and its latest release is the package's version."""

from __future__ import annotations

import re

import pml_rll
from tests.docs.snippets import ROOT

SECTIONS = {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}


def _versions(text: str) -> list[str]:
    return re.findall(r"^## \[([^\]]+)\]", text, flags=re.M)


def test_latest_release_is_the_package_version():
    versions = _versions((ROOT / "CHANGELOG.md").read_text(encoding="utf-8"))
    released = [v for v in versions if v != "Unreleased"]
    assert released, "CHANGELOG.md has no released version"
    assert released[0] == pml_rll.__version__
    assert versions[0] in ("Unreleased", pml_rll.__version__)


def test_only_keep_a_changelog_sections():
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    sections = set(re.findall(r"^### (.+)$", text, flags=re.M))
    assert sections and sections <= SECTIONS, sections - SECTIONS


def test_setup_cfg_agrees_with_the_package_version():
    # the package's __version__ is the source; setup.cfg reads it (attr:) or at least agrees with it
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg", encoding="utf-8")
    declared = cfg["metadata"]["version"].strip()
    assert declared in ("attr: pml_rll.__version__", pml_rll.__version__), declared
