"""CrossBatchMemory: PML's cross-batch memory wrapper, also accepting this package's RankedListLoss."""

from __future__ import annotations

from pytorch_metric_learning.losses import CrossBatchMemory as PMLCrossBatchMemory
from pytorch_metric_learning.losses import RankedListLoss as PMLRankedListLoss

from .ranked_list_loss import RankedListLoss


class CrossBatchMemory(PMLCrossBatchMemory):
    """PML's ``CrossBatchMemory`` ("Cross-Batch Memory for Embedding Learning", CVPR 2020) that also
    accepts this package's ``RankedListLoss``.

    PML's class admits only losses on a fixed list of names. This subclass adds ours (identified by type, so PML's
    own ``RankedListLoss``, which rejects ``ref_emb``, is still refused). Arguments and behaviour are PML's:
    ``CrossBatchMemory(loss, embedding_size, memory_size=1024, miner=None)``; the memory is the reference set, the
    queries are the current batch, and self-comparisons are removed through the indices tuple it builds.
    """

    def __init__(self, loss, embedding_size: int, memory_size: int = 1024, miner=None, **kwargs):
        if isinstance(loss, PMLRankedListLoss):
            raise ValueError(
                "CrossBatchMemory: PML's RankedListLoss does not accept ref_emb; use pml_rll.losses.RankedListLoss"
            )
        self._ours = isinstance(loss, RankedListLoss)
        super().__init__(loss, embedding_size, memory_size=memory_size, miner=miner, **kwargs)

    def check_loss_support(self, loss_name):  # type: ignore[override]
        if not self._ours:
            super().check_loss_support(loss_name)
