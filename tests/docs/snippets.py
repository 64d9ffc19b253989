"""Python code blocks of the README and of the documentation pages, for the snippet tests.

A block is a fenced ```` ```python ```` block. It runs in the test suite unless the nearest non-blank line before its
fence is a comment ``<!-- not-runnable: the reason -->``. The exports under ``docs/results/`` are written by
scripts and hold no code to run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"^<!--\s*not-runnable:(?P<reason>.*?)-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")


@dataclass(frozen=True)
class Block:
    """One Python block: where it is, its code, and the reason it does not run (``None``: it runs)."""

    path: Path
    line: int  # 1-based line of the opening fence
    code: str
    not_runnable: str | None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT).as_posix()}:{self.line}"


def markdown_files(root: Path = ROOT) -> list[Path]:
    """The README, the changelog and every page of docs/ (the script-written docs/results/ aside)."""
    files = [root / "README.md", root / "CHANGELOG.md"]
    files += sorted(p for p in (root / "docs").rglob("*.md") if "results" not in p.relative_to(root / "docs").parts)
    return [p for p in files if p.exists()]


def python_blocks(path: Path) -> list[Block]:
    """Every ```` ```python ```` block of a Markdown file; raises ValueError on an unclosed fence or a bad marker."""
    lines = path.read_text(encoding="utf-8").split("\n")
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            marker = MARKER.match(lines[i].strip())
            if marker:
                nxt = next((j for j in range(i + 1, len(lines)) if lines[j].strip()), None)
                if nxt is None or not (FENCE.match(lines[nxt]) and FENCE.match(lines[nxt])["info"] == "python"):
                    raise ValueError(f"{path}:{i + 1}: a not-runnable marker must directly precede a python block")
                if not marker["reason"].strip():
                    raise ValueError(f"{path}:{i + 1}: a not-runnable marker needs its reason")
            i += 1
            continue
        fence, indent, start = m["fence"], m["indent"], i
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(fence)), None)
        if end is None:
            raise ValueError(f"{path}:{start + 1}: unclosed code fence")
        if m["info"] == "python":
            prev = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            marker = MARKER.match(prev)
            body = [line[len(indent) :] if line.startswith(indent) else line for line in lines[start + 1 : end]]
            blocks.append(Block(path, start + 1, "\n".join(body) + "\n", marker["reason"].strip() if marker else None))
        i = end + 1
    return blocks


def all_blocks(root: Path = ROOT) -> list[Block]:
    """The Python blocks of every documentation file, in file order."""
    return [b for p in markdown_files(root) for b in python_blocks(p)]
