"""Results: storing, measuring and reporting.

:mod:`~benchmarks.results.store` (the results store: claims, records, reuse), :mod:`~benchmarks.results.metrics`
and :mod:`~benchmarks.results.knn` (retrieval metrics, exact or with a faiss index),
:mod:`~benchmarks.results.report` (the tables, CSV and figure of a command), and the readers of finished results
behind ``python -m benchmarks.stats`` (:mod:`~benchmarks.results.stats`), ``.convergence``
(:mod:`~benchmarks.results.convergence`) and ``.headline`` (:mod:`~benchmarks.results.headline`)."""

from __future__ import annotations
