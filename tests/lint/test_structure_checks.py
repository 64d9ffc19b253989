"""The structure checks of `make lint` hold on the repository and catch what they are for: an import back up a
floor or an import circle (in the library and in the benchmarks), the library importing the benchmarks, a function
over the length limit (the limit on positional parameters is ruff's PLR0917, configured in pyproject.toml)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _function_length():
    spec = importlib.util.spec_from_file_location("function_length", ROOT / ".ci" / "function_length.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _function(name: str, lines: int, indent: str = "", decorated: bool = False) -> str:
    """Source of a function of exactly ``lines`` lines (a decorator and the def line included)."""
    head = [f"{indent}@staticmethod"] if decorated else []
    head.append(f"{indent}def {name}():")
    body = [f"{indent}    x = {i}" for i in range(lines - len(head))]
    return "\n".join(head + body) + "\n"


def test_function_length_counts_every_line_from_the_decorator_to_the_end():
    check = _function_length()
    assert list(check.long_functions(_function("f", 80), 80)) == []
    assert list(check.long_functions(_function("f", 81), 80)) == [(1, "f", 81)]
    method = "class C:\n" + _function("m", 81, indent="    ", decorated=True)
    assert list(check.long_functions(method, 80)) == [(3, "C.m", 81)]
    assert list(check.long_functions("class C:\n" + _function("m", 80, indent="    ", decorated=True), 80)) == []
    # a nested function is reported under its own name, beside the function that holds it
    outer = "def outer():\n" + _function("inner", 81, indent="    ") + "    return inner\n"
    assert [name for _, name, _ in check.long_functions(outer, 80)] == ["outer", "outer.inner"]


def test_function_length_passes_on_the_configured_paths_and_fails_on_a_long_function(tmp_path, capsys):
    check = _function_length()
    max_lines, paths, _ = check.settings()
    assert max_lines == 80 and paths == [str(ROOT / "pml_rll"), str(ROOT / "benchmarks")]
    assert check.main([]) == 0
    (tmp_path / "long.py").write_text(_function("too_long", 81), encoding="utf-8")
    assert check.main([str(tmp_path)]) == 1
    assert "long.py:1: too_long is 81 lines (more than 80)" in capsys.readouterr().out


def test_function_length_exclusions_name_functions_still_over_the_limit():
    # an exclusion lets one named function through; once that function is split (or gone), its exclusion must go
    check = _function_length()
    max_lines, _, exclude = check.settings()
    for item in sorted(exclude):
        path, name = item.split("::")
        source = (ROOT / path).read_text(encoding="utf-8")
        assert name in [n for _, n, _ in check.long_functions(source, max_lines)], f"{item}: not over the limit"


@pytest.fixture
def tree(tmp_path):
    """A copy of the packages and of pyproject.toml, to break on purpose."""
    pytest.importorskip("importlinter", reason="import-linter comes with the lint extra")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("pml_rll", "benchmarks"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    command = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [sys.executable, "-c", command, "--no-cache", "--config", str(root / "pyproject.toml")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text(encoding="utf-8") + line + "\n", encoding="utf-8")


@pytest.mark.parametrize(
    "module,line,broken",
    [
        (None, None, None),
        (
            "pml_rll/reducers/ranked_list_reducer.py",
            "from ..losses import ranked_list_loss  # noqa: E402,F401",
            "pml_rll: floors, no import back up BROKEN",
        ),
        (
            "pml_rll/functional/ranked_list.py",
            "from . import ranked_list_dense  # noqa: E402,F401",
            "pml_rll: no import circle between the modules or subpackages of one package BROKEN",
        ),
        (
            "pml_rll/utils/distances.py",
            "import benchmarks.core.common  # noqa: E402,F401",
            "the library never imports the benchmarks BROKEN",
        ),
        (
            "benchmarks/core/common.py",
            "from ..results import store  # noqa: E402,F401",
            "benchmarks: stages, no import back up BROKEN",
        ),
        (
            "benchmarks/results/metrics.py",
            "from . import report  # noqa: E402,F401",
            "benchmarks: no import circle between the modules or subpackages of one package BROKEN",
        ),
    ],
    ids=[
        "as-is",
        "import-back-up",
        "import-circle",
        "library-imports-benchmarks",
        "benchmarks-import-back-up",
        "benchmarks-import-circle",
    ],
)
def test_import_contracts_hold_and_catch_each_kind_of_break(tree, module, line, broken):
    if module is not None:
        _append(tree / module, line)
    result = _lint_imports(tree)
    out = result.stdout + result.stderr
    if broken is None:
        assert result.returncode == 0, out
        assert "Contracts: 5 kept, 0 broken." in out
    else:
        assert result.returncode == 1, out
        assert broken in out
