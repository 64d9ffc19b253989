"""SampleEmbeddingMiner: run any PML miner on the sample part of packed NAMR embeddings."""

from __future__ import annotations

import torch
from pytorch_metric_learning.miners import BaseMiner

from ..functional import namr as F_namr


class SampleEmbeddingMiner(BaseMiner):
    """Delegates to ``miner`` on x, the first ``embedding_size`` columns of packed ``[x || s]`` inputs.

    NAMR (TCSVT 2022) embedders output ``[x || s]`` (docs/namr.md, section 3.3); a miner that saw the packed
    vector would mine on the structure embedding too. Put this in a PML trainer's ``mining_funcs["tuple_miner"]``.
    Alternatively give the miner to :class:`~pml_rll.losses.NAMRLoss` (``miner=``), which mines on x
    after the mean-distance scaling, i.e. in the same geometry as the loss.

    Args:
        miner: any PML miner (called as ``miner(x, labels, ref_x, ref_labels)``).
        embedding_size: d; inputs must have width ``2 * d``. ``ref_emb`` may be packed (width 2d) or
            sample-only (width d).
        scale_by_mean_distance: divide x (and ref x) by the batch mean pairwise distance of x before
            mining, to match :class:`NAMRLoss` with ``scale_by_mean_distance=True`` (default False: the
            raw x, as a trainer-level miner sees it without NAMR).
        **kwargs: passed to ``BaseMiner``.
    """

    def __init__(self, miner: torch.nn.Module, embedding_size: int, scale_by_mean_distance: bool = False, **kwargs):
        super().__init__(**kwargs)
        if not callable(miner):
            raise TypeError(f"miner must be callable, got {type(miner).__name__}")
        if not isinstance(embedding_size, int) or isinstance(embedding_size, bool) or embedding_size < 1:
            raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
        self.miner = miner
        self.embedding_size = embedding_size
        self.scale_by_mean_distance = bool(scale_by_mean_distance)
        self.add_to_recordable_attributes(list_of_names=["embedding_size"], is_stat=False)

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        # validate widths before BaseMiner's processing so the error names the packed input
        F_namr.split_packed(embeddings, self.embedding_size)
        if ref_emb is not None:
            self._ref_sample(ref_emb)
        return super().forward(embeddings, labels, ref_emb, ref_labels)

    def _ref_sample(self, ref_emb: torch.Tensor) -> torch.Tensor:
        return F_namr.sample_part(ref_emb, self.embedding_size, "ref_emb")

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        x, _ = F_namr.split_packed(embeddings, self.embedding_size)
        same_ref = ref_emb is embeddings
        ref_x = x if same_ref else self._ref_sample(ref_emb)
        if self.scale_by_mean_distance:
            scale = F_namr.mean_pairwise_distance(x)
            x, ref_x = x / scale, ref_x / scale
        if same_ref:
            return self.miner(x, labels)
        return self.miner(x, labels, ref_x, ref_labels)
