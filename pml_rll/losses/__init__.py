"""Losses, used like ``pytorch_metric_learning.losses``."""

from __future__ import annotations

from .cross_batch_memory import CrossBatchMemory  # noqa: F401
from .distributed_cross_batch_memory import DistributedCrossBatchMemory  # noqa: F401
from .multi_cluster_ranking_loss import MultiClusterRankingLoss  # noqa: E402,F401
from .namr_loss import NAMR_CONFIGS, NAMRLoss, make_namr_loss, namr_config, validated_retrieval  # noqa: E402,F401
from .ranked_list_loss import RankedListLoss  # noqa: F401
