"""The benchmark runner and its commands (``python -m benchmarks.<command>``), laid out by the stages of a command:
``plan`` (the work of a command), ``execute`` (running it), ``results`` (store, metrics, reports), ``losses`` and
``data`` (what is compared, and on which data), ``core`` (what every stage shares). Imports only go down these
floors (``[tool.importlinter]`` in pyproject.toml; docs/contributing.md, "The layout of the benchmark runner")."""

from __future__ import annotations
