"""Miners, used like ``pytorch_metric_learning.miners``."""

from .ranked_list_miner import RankedListMiner  # noqa: F401
