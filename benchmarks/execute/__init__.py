"""Execution: running the work of a command.

:mod:`~benchmarks.execute.executor` (the scheduler and its worker processes),
:mod:`~benchmarks.execute.pipeline` (one training run and its evaluation),
:mod:`~benchmarks.execute.distributed` (data-parallel runs under ``torchrun``) and
:mod:`~benchmarks.execute.trunks` (named and pretrained trunks)."""

from __future__ import annotations
