"""What every stage of a benchmark command shares; imports nothing else of ``benchmarks``.

:mod:`~benchmarks.core.common` (atomic writes, devices, the machine's description, closest-name suggestions),
:mod:`~benchmarks.core.progress` (progress bars) and :mod:`~benchmarks.core.provenance` (the digests of the code
that decides a result, part of every result key)."""

from __future__ import annotations
