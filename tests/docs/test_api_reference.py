"""The API reference (docs/api/) has an entry for every public class and function of pml_rll."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import pml_rll
from tests.docs.snippets import ROOT

API = ROOT / "docs" / "api"
EXPORTING = ("losses", "miners", "reducers", "modules", "retrieval")  # packages whose __init__ exports the classes
MODULE_LEVEL = ("functional", "utils")  # packages documented module by module


def _directives() -> set[str]:
    found = set()
    for page in API.glob("*.md"):
        found |= set(re.findall(r"^::: ([\w.]+)\s*$", page.read_text(encoding="utf-8"), flags=re.M))
    return found


def _public_exports(package: str) -> list[str]:
    mod = importlib.import_module(f"pml_rll.{package}")
    return [
        f"pml_rll.{package}.{name}"
        for name, obj in vars(mod).items()
        if not name.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and getattr(obj, "__module__", "").startswith("pml_rll.")
    ]


def test_every_exported_class_and_function_has_an_entry():
    directives = _directives()
    expected = [name for package in EXPORTING for name in _public_exports(package)]
    assert "pml_rll.losses.RankedListLoss" in expected and len(expected) >= 12
    missing = sorted(set(expected) - directives)
    assert not missing, f"docs/api/ lacks ::: entries for {missing}"


def test_every_module_of_functional_and_utils_has_an_entry():
    directives = _directives()
    for package in MODULE_LEVEL:
        pkg = importlib.import_module(f"pml_rll.{package}")
        modules = [f"pml_rll.{package}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__) if not m.ispkg]
        assert modules
        missing = sorted(set(modules) - directives)
        assert not missing, f"docs/api/ lacks ::: entries for {missing}"


def test_every_entry_names_something_that_exists():
    for target in _directives():
        module, _, attr = target.rpartition(".")
        try:
            importlib.import_module(target)
        except ImportError:
            assert hasattr(importlib.import_module(module), attr), target


def test_every_api_page_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in API.glob("*.md"):
        assert f"api/{page.name}" in nav, page.name
    assert pml_rll.__version__
