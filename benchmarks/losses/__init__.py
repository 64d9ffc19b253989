"""The losses a benchmark compares.

:mod:`~benchmarks.losses.registry` (every entry with its hyper-parameters: defaults with their sources, search
spaces) and :mod:`~benchmarks.losses.config` (a user's ``--config`` file of new entries and overrides). The loss
wrapper of the cross-batch memory entries stays at :mod:`benchmarks.warmup_cross_batch_memory`: its import path is
part of the result key of every run that builds it."""

from __future__ import annotations
