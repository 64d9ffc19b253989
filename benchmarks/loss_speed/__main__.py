"""``python -m benchmarks.loss_speed``: the command line (see the package docstring)."""

from __future__ import annotations

from .cli import main

main()
