"""Planning a benchmark command: the work it does, before anything runs.

:mod:`~benchmarks.plan.sources` (the runs and tuning trials of a command: their result keys, their claims in the
results store, their records)."""

from __future__ import annotations
