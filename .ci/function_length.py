"""Fails on any function or method longer than ``max-lines`` lines, decorators and docstring included.

Settings in pyproject.toml, ``[tool.function_length]``: ``max-lines``, ``paths`` (folders or files checked) and
``exclude`` (functions let through, each as ``path::qualified.name``, the path relative to pyproject.toml).
Run by ``make lint``: ``python .ci/function_length.py`` (or with paths to check instead of the configured ones).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # the bench extra installs tomli on Python < 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def settings(pyproject: Path = ROOT / "pyproject.toml") -> tuple[int, list[str], set[str]]:
    """(max-lines, paths, exclude) from ``[tool.function_length]``, the paths relative to the file's folder."""
    table = tomllib.loads(pyproject.read_text(encoding="utf-8"))["tool"]["function_length"]
    paths = [str(pyproject.parent / p) for p in table["paths"]]
    return int(table["max-lines"]), paths, set(table.get("exclude", []))


def long_functions(source: str, max_lines: int) -> Iterator[tuple[int, str, int]]:
    """(line, qualified name, length) of every function in ``source`` longer than ``max_lines``."""

    def visit(node: ast.AST, prefix: str) -> Iterator[tuple[int, str, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                first = min([d.lineno for d in child.decorator_list] + [child.lineno])
                length = (child.end_lineno or child.lineno) - first + 1
                if length > max_lines:
                    yield child.lineno, name, length
                yield from visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                yield from visit(child, f"{prefix}{child.name}.")
            else:
                yield from visit(child, prefix)

    yield from visit(ast.parse(source), "")


def python_files(paths: list[str]) -> Iterator[Path]:
    """The ``.py`` files of ``paths`` (files, or folders searched recursively), sorted."""
    for path in map(Path, paths):
        yield from sorted(path.rglob("*.py")) if path.is_dir() else [path]


def main(argv: list[str] | None = None) -> int:
    """Print every function over the limit as ``path:line: name is N lines``; 1 if there is one, else 0."""
    max_lines, paths, exclude = settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", default=paths, help=f"files or folders (default: {paths})")
    parser.add_argument("--max-lines", type=int, default=max_lines, help=f"(default: {max_lines})")
    args = parser.parse_args(argv)
    found = 0
    for file in python_files(args.paths):
        where = file.resolve().relative_to(ROOT).as_posix() if file.resolve().is_relative_to(ROOT) else str(file)
        for line, name, length in long_functions(file.read_text(encoding="utf-8"), args.max_lines):
            if f"{where}::{name}" in exclude:
                continue
            print(f"{file}:{line}: {name} is {length} lines (more than {args.max_lines})")
            found += 1
    if found:
        print(f"{found} function(s) longer than {args.max_lines} lines: split them into named steps")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
