"""Miners, used like ``pytorch_metric_learning.miners``."""

from __future__ import annotations

from .ranked_list_miner import RankedListMiner  # noqa: F401
from .sample_embedding_miner import SampleEmbeddingMiner  # noqa: E402,F401
