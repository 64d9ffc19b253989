"""WarmupCrossBatchMemory: the cross-batch memory recipe of XBM (CVPR 2020), warm-up included."""

from __future__ import annotations

from typing import Any

import torch

from pml_rll.losses.distributed_cross_batch_memory import DistributedCrossBatchMemory
from pml_rll.utils.validation import check_int


class WarmupCrossBatchMemory(DistributedCrossBatchMemory):
    """A cross-batch memory used as in "Cross-Batch Memory for Embedding Learning" (CVPR 2020): the loss of the
    batch alone while the embeddings still drift fast, then the loss of the batch plus the loss of the batch
    against the memory of past embeddings.

    * The first ``start_iteration`` calls (training iterations) return the wrapped loss of the batch, with the
      ``miner`` mining the batch, exactly what the loss gives without a memory; nothing is enqueued.
    * From then on each call enqueues the batch and returns ``batch loss + memory loss``, the memory loss being
      that of :class:`pml_rll.losses.DistributedCrossBatchMemory` (queries: the batch; references: the memory,
      the batch's own rows included, each query's pair with its own copy removed; the memory is detached).

    Under ``torchrun`` the memory term is the global one (every process enqueues the gathered global batch); the
    batch term is each process's own shard.

    Args:
        loss: the wrapped loss (this package's ``RankedListLoss`` or a loss PML's ``CrossBatchMemory`` supports).
        embedding_size: width of the embeddings.
        memory_size: rows of (embedding, label) kept; at least one (global) batch.
        miner: optional PML miner, applied to the batch and to (batch, memory).
        start_iteration: calls before the memory is used (0: from the first call).

    ``indices_tuple`` and ``enqueue_mask`` are refused (give the memory a ``miner``). A rejected call changes
    nothing: neither the memory nor the iteration count.
    """

    def __init__(  # type: ignore[no-untyped-def]
        self, loss, embedding_size: int, memory_size: int = 1024, miner=None, start_iteration: int = 0, **kwargs
    ) -> None:
        start_iteration = check_int("start_iteration", start_iteration, low=0)
        super().__init__(loss, embedding_size, memory_size=memory_size, miner=miner, **kwargs)
        self.start_iteration = start_iteration
        self.iteration = 0
        self.add_to_recordable_attributes(list_of_names=["start_iteration", "iteration"], is_stat=False)

    def forward(self, embeddings, labels, indices_tuple=None, enqueue_mask=None) -> Any:  # type: ignore[no-untyped-def]
        for name, value in (("indices_tuple", indices_tuple), ("enqueue_mask", enqueue_mask)):
            if value is not None:
                raise ValueError(f"{name} is not supported by WarmupCrossBatchMemory (give the memory a miner)")
        self.check_input(embeddings, labels)  # before any work, so that the warm-up rejects what the memory would
        pairs = self.miner(embeddings, labels) if self.miner is not None else None
        batch: torch.Tensor = self.loss(embeddings, labels, pairs)
        if self.iteration < self.start_iteration:
            self.iteration += 1
            return batch
        memory = super().forward(embeddings, labels)
        self.iteration += 1
        return batch + memory
