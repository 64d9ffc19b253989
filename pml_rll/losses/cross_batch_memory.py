"""CrossBatchMemory: PML's cross-batch memory wrapper, also accepting this package's RankedListLoss."""

from __future__ import annotations

import torch
from pytorch_metric_learning.losses import CrossBatchMemory as PMLCrossBatchMemory
from pytorch_metric_learning.losses import RankedListLoss as PMLRankedListLoss

from ..utils.validation import check_batch, check_callable, check_indices_tuple, check_int, check_not_meta
from .ranked_list_loss import RankedListLoss


class CrossBatchMemory(PMLCrossBatchMemory):
    """PML's ``CrossBatchMemory`` ("Cross-Batch Memory for Embedding Learning", CVPR 2020) that also
    accepts this package's ``RankedListLoss``.

    PML's class admits only losses on a fixed list of names. This subclass adds ours (identified by type, so PML's
    own ``RankedListLoss``, which rejects ``ref_emb``, is still refused). Arguments and behaviour are PML's:
    ``CrossBatchMemory(loss, embedding_size, memory_size=1024, miner=None)``; the memory is the reference set, the
    queries are the current batch, and self-comparisons are removed through the indices tuple it builds.

    Bad input (a choice of this package; PML asserts or fails inside the update): ``embedding_size`` and
    ``memory_size`` must be positive ints (numpy ints too), ``loss`` and ``miner`` callable. Every call is checked
    before anything is enqueued: embeddings 2-D floating point of width ``embedding_size`` and finite, labels a 1-D
    integer tensor of the batch's length, at most ``memory_size`` rows to enqueue, ``enqueue_mask`` a 1-D bool
    tensor of the batch's length, ``indices_tuple`` pairs of batch rows and memory slots. A rejected call raises a
    ``ValueError``/``TypeError`` naming the argument and leaves the memory as it was; so does a call whose loss or
    miner raises (the overwritten slots are restored). An empty batch (0 rows) returns a zero loss (connected to the
    embeddings, of their dtype) without calling the loss or the miner, and an ``enqueue_mask`` that selects no row
    enqueues nothing; in both cases the memory is left as it was (PML fails inside its update on the first and
    marks a partly filled memory as full on the second).
    """

    def __init__(self, loss, embedding_size: int, memory_size: int = 1024, miner=None, **kwargs):
        check_callable("loss", loss)
        embedding_size = check_int("embedding_size", embedding_size)
        memory_size = check_int("memory_size", memory_size)
        check_callable("miner", miner, optional=True)
        if isinstance(loss, PMLRankedListLoss):
            raise ValueError(
                "CrossBatchMemory: PML's RankedListLoss does not accept ref_emb; use pml_rll.losses.RankedListLoss"
            )
        self._ours = isinstance(loss, RankedListLoss)
        super().__init__(loss, embedding_size, memory_size=memory_size, miner=miner, **kwargs)

    def check_loss_support(self, loss_name):  # type: ignore[override]
        """Accept every loss PML accepts, and :class:`pml_rll.losses.RankedListLoss`."""
        if not self._ours:
            super().check_loss_support(loss_name)

    def check_input(self, embeddings, labels, indices_tuple=None, enqueue_mask=None) -> int:
        """Raise on bad input to :meth:`forward` (nothing is changed); return the number of rows to enqueue."""
        check_batch(embeddings, labels, width=self.embedding_size, labels_required=True)
        check_not_meta("embeddings", embeddings, "CrossBatchMemory", "its pairs are listed from the labels' values")
        n = embeddings.shape[0]
        if indices_tuple is not None and enqueue_mask is not None:
            raise ValueError("indices_tuple and enqueue_mask are mutually exclusive")
        if enqueue_mask is not None:
            if not torch.is_tensor(enqueue_mask) or enqueue_mask.dtype != torch.bool:
                got = getattr(enqueue_mask, "dtype", type(enqueue_mask).__name__)
                raise TypeError(f"enqueue_mask must be a bool tensor, got {got}")
            if enqueue_mask.shape != (n,):
                raise ValueError(f"enqueue_mask must have shape ({n},) like labels, got {tuple(enqueue_mask.shape)}")
            n = int(enqueue_mask.sum())
        if n > self.memory_size:
            raise ValueError(
                f"embeddings: {n} rows to enqueue exceed memory_size={self.memory_size}; "
                "use a larger memory_size or a smaller batch"
            )
        if indices_tuple is not None:  # queries: the batch; references: the memory once the batch is enqueued
            filled = self.has_been_filled or self.queue_idx + n >= self.memory_size
            check_indices_tuple(indices_tuple, embeddings.shape[0], self.memory_size if filled else self.queue_idx + n)
        return n

    def add_to_memory(self, embeddings, labels, batch_size):
        """PML's update of the memory; with ``batch_size == 0`` nothing is enqueued and nothing else changes."""
        if batch_size == 0:  # nothing to enqueue (PML's update would mark the memory as filled)
            self.curr_batch_idx = torch.arange(self.queue_idx, self.queue_idx, device=labels.device)
            return
        super().add_to_memory(embeddings, labels, batch_size)

    def forward(self, embeddings, labels, indices_tuple=None, enqueue_mask=None):
        """PML's ``CrossBatchMemory.forward``: enqueue the batch, then compute the loss of the batch against the memory.

        Args:
            embeddings: (N, embedding_size) float tensor.
            labels: (N,) integer labels (required).
            indices_tuple: optional pairs or triplets between the batch and the memory (mutually exclusive with
                ``enqueue_mask``).
            enqueue_mask: optional (N,) bool tensor: only these rows are enqueued.

        Returns:
            The loss, a scalar tensor; for an empty batch a zero loss, the memory unchanged. A rejected call raises
            before the memory changes.
        """
        n = self.check_input(embeddings, labels, indices_tuple, enqueue_mask)
        if embeddings.shape[0] == 0:  # no queries and nothing to enqueue: a zero loss, the memory as it was
            return torch.sum(embeddings * 0)
        slots = (self.queue_idx + torch.arange(n, device=self.embedding_memory.device)) % self.memory_size
        saved = (
            self.queue_idx,
            self.has_been_filled,
            self.embedding_memory[slots].clone(),
            self.label_memory[slots].clone(),
            self.__dict__.get("curr_batch_idx"),
        )
        try:
            return super().forward(embeddings, labels, indices_tuple, enqueue_mask)
        except Exception:
            # the loss or the miner refused the batch after it was enqueued: put the memory back as it was
            self.queue_idx, self.has_been_filled = saved[0], saved[1]
            if saved[4] is None:
                self.__dict__.pop("curr_batch_idx", None)
            else:
                self.curr_batch_idx = saved[4]
            slots = slots.to(self.embedding_memory.device)
            self.embedding_memory[slots] = saved[2].to(self.embedding_memory)
            self.label_memory[slots] = saved[3].to(self.label_memory)
            raise
