"""Reducers, used like ``pytorch_metric_learning.reducers``."""

from __future__ import annotations

from .ranked_list_reducer import RankedListReducer  # noqa: F401
