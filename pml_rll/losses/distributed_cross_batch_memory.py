"""DistributedCrossBatchMemory: a cross-batch memory that every data-parallel process fills with the global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from ..utils.validation import check_batch, check_bool
from .cross_batch_memory import CrossBatchMemory


def _gather_in_rank_order(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' ``x`` (first dimension may differ between ranks) concatenated in rank order, and the offset of
    this rank's rows in the result. The result carries no gradient."""
    world, rank = dist.get_world_size(), dist.get_rank()
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = x.detach().contiguous()
    if x.shape[0] < longest:
        padded = torch.cat([padded, padded.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]), sum(counts[:rank])


class DistributedCrossBatchMemory(CrossBatchMemory):
    """:class:`CrossBatchMemory` ("Cross-Batch Memory for Embedding Learning", CVPR 2020) for data-parallel
    training: every process enqueues the *global* batch, so every process holds the same memory.

    With one process per shard of a batch, a plain cross-batch memory in each process only ever sees its own shard:
    the memories of the processes differ, and none holds what one process training on the whole batch would hold.
    Here each call gathers the embeddings and labels of all processes (``torch.distributed.all_gather``, in rank
    order, detached), enqueues that global batch, and computes the loss of this process's queries (its own batch,
    with gradient) against the whole memory; the pair of a query with its own copy in the memory is removed, as in
    the single-process class. So, at every step, the memory of every rank equals the memory of one process fed the
    global batches, and the per-rank losses are those of the single-process loss restricted to this rank's queries:
    for a loss that averages over queries, averaging the gradients over the ranks (what
    ``DistributedDataParallel`` does) gives the single-process gradient on the global batch. For losses whose
    reducer averages over non-zero terms only, the per-rank averages weight the ranks slightly differently.

    Without an initialised process group, or with one process, it is exactly :class:`CrossBatchMemory`.

    Args:
        loss: the wrapped loss (this package's ``RankedListLoss`` or one of PML's supported losses).
        embedding_size: width of the embeddings.
        memory_size: number of (embedding, label) rows kept; must hold at least one global batch.
        miner: optional PML miner, called with the memory as reference set.
        gather_distributed: ``True`` (default): fill the memory with the global batch when a process group is
            initialised. ``False``: behave like :class:`CrossBatchMemory` in each process (per-rank memories).

    Each gathering call runs the base class's ``forward`` with the concatenation ``[own rows; global batch]`` and
    an ``enqueue_mask`` selecting the global batch, so the base class's input checks and memory handling apply;
    ``enqueue_mask`` and ``indices_tuple`` of the caller are therefore not supported when gathering (give the
    memory a ``miner``). The global batch must fit in ``memory_size``.
    """

    def __init__(  # type: ignore[no-untyped-def]
        self, loss, embedding_size: int, memory_size: int = 1024, miner=None, gather_distributed: bool = True, **kwargs
    ) -> None:
        gather_distributed = check_bool("gather_distributed", gather_distributed)
        super().__init__(loss, embedding_size, memory_size=memory_size, miner=miner, **kwargs)
        self.gather_distributed = gather_distributed
        self._query_slice: slice | None = None  # this rank's rows in the global batch, during a gathering call

    def forward(self, embeddings, labels, indices_tuple=None, enqueue_mask=None):  # type: ignore[no-untyped-def]
        """Gather the global batch, enqueue it, and compute the loss of this process's queries against the memory.

        Outside ``torch.distributed`` (or with one process, or ``gather_distributed=False``) this is
        :meth:`pml_rll.losses.CrossBatchMemory.forward`. ``indices_tuple`` and ``enqueue_mask`` are not supported while
        gathering (give the memory a miner instead).
        """
        gather = self.gather_distributed and dist.is_available() and dist.is_initialized()
        if not gather or dist.get_world_size() == 1:
            return super().forward(embeddings, labels, indices_tuple, enqueue_mask)
        for name, value in (("enqueue_mask", enqueue_mask), ("indices_tuple", indices_tuple)):
            if value is not None:  # (give the memory a miner instead of an indices_tuple)
                raise ValueError(f"{name} is not supported with gather_distributed=True under torch.distributed")
        # this rank's rows, checked before the collective (the base class checks the gathered batch again)
        check_batch(embeddings, labels, width=self.embedding_size, labels_required=True)
        labels = c_f.to_device(labels, device=embeddings.device)
        all_emb, offset = _gather_in_rank_order(embeddings)
        all_labels, _ = _gather_in_rank_order(labels)
        if all_emb.shape[0] > self.memory_size:
            raise ValueError(
                f"embeddings: the global batch ({all_emb.shape[0]} rows over {dist.get_world_size()} processes) "
                f"exceeds memory_size={self.memory_size}"
            )
        n = embeddings.shape[0]
        # the base class's forward: queries = this rank's rows (with gradient), enqueued = the global batch
        enqueue = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(all_emb.shape[0], dtype=torch.bool)])
        self._query_slice = slice(offset, offset + n)
        try:
            return super().forward(
                torch.cat([embeddings, all_emb.to(embeddings.dtype)]),
                torch.cat([labels, all_labels]),
                None,
                enqueue.to(embeddings.device),
            )
        finally:
            self._query_slice = None

    def create_indices_tuple(  # type: ignore[no-untyped-def]
        self, embeddings, labels, E_mem, L_mem, input_indices_tuple, do_remove_self_comparisons
    ):
        """The base class's pairs; when gathering, without the pair of each query and its own copy in the memory
        (the base class removes them only when the queries are the enqueued rows)."""
        indices_tuple = super().create_indices_tuple(
            embeddings, labels, E_mem, L_mem, input_indices_tuple, do_remove_self_comparisons
        )
        if self._query_slice is not None:
            own_slots = self.curr_batch_idx[self._query_slice]  # set when enqueuing
            indices_tuple = lmu.remove_self_comparisons(indices_tuple, own_slots, self.memory_size)
        return indices_tuple
