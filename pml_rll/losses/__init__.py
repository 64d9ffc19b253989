"""Losses, used like ``pytorch_metric_learning.losses``."""

from .ranked_list_loss import RankedListLoss  # noqa: F401
from .cross_batch_memory import CrossBatchMemory  # noqa: F401
