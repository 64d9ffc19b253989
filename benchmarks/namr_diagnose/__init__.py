"""The NAMR diagnosis and ablation (``python -m benchmarks.namr_diagnose``): what the structure embedding learns and
what re-ranking does with it. The command and the analyses are in :mod:`benchmarks.namr_diagnose.diagnose`."""

from __future__ import annotations
