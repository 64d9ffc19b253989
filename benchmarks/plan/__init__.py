"""Planning a benchmark command: the work it does, before anything runs.

:mod:`~benchmarks.plan.options` (the command line, every check made before any data is loaded, and the resolved
options); :mod:`~benchmarks.plan.sources` (the runs and tuning trials of a command: their result keys, their claims
in the results store, their records)."""

from __future__ import annotations
