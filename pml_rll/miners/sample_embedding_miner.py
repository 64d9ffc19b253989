"""SampleEmbeddingMiner: run any PML miner on the sample part of packed NAMR embeddings."""

from __future__ import annotations

import torch
from pytorch_metric_learning.miners import BaseMiner

from ..functional import namr as F_namr
from ..utils.validation import check_batch, check_bool, check_callable, check_int


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

    Bad input (see :mod:`pml_rll.utils.validation`): packed embeddings (N, 2d) and ``ref_emb`` (R, 2d or d) must be
    floating point and finite (a NaN row raises instead of being silently dropped), labels (and ``ref_labels`` with
    ``ref_emb``) 1-D integer tensors of matching length.
    """

    def __init__(self, miner: torch.nn.Module, embedding_size: int, scale_by_mean_distance: bool = False, **kwargs):
        check_callable("miner", miner)
        embedding_size = check_int("embedding_size", embedding_size)
        scale_by_mean_distance = check_bool("scale_by_mean_distance", scale_by_mean_distance)
        super().__init__(**kwargs)
        self.miner = miner
        self.embedding_size = embedding_size
        self.scale_by_mean_distance = bool(scale_by_mean_distance)
        self.add_to_recordable_attributes(list_of_names=["embedding_size"], is_stat=False)

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        """Mine with the wrapped miner on the sample part x of packed embeddings ``[x || s]`` (N, 2 * embedding_size).

        ``ref_emb`` may be packed or hold the sample part alone (M, embedding_size). Returns the wrapped miner's tuple.
        """
        # every argument checked before BaseMiner resets the statistics: a rejected call changes nothing
        d = self.embedding_size
        check_batch(embeddings, labels, ref_emb, ref_labels, packed=d, labels_required=True)
        if self.scale_by_mean_distance and embeddings.shape[0] < 2:
            n = embeddings.shape[0]
            raise ValueError(f"embeddings: scale_by_mean_distance needs at least 2 embeddings, got {n}")
        return super().forward(embeddings, labels, ref_emb, ref_labels)

    def _ref_sample(self, ref_emb: torch.Tensor) -> torch.Tensor:
        return F_namr.sample_part(ref_emb, self.embedding_size, "ref_emb")

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        """PML's hook: the wrapped miner's indices on the sample embeddings (arguments already checked)."""
        x, _ = F_namr.split_packed(embeddings, self.embedding_size)
        same_ref = ref_emb is embeddings
        ref_x = x if same_ref else self._ref_sample(ref_emb).to(x.dtype)
        if self.scale_by_mean_distance:
            scale = F_namr.mean_pairwise_distance(x)
            x, ref_x = x / scale, ref_x / scale
        if same_ref:
            return self.miner(x, labels)
        return self.miner(x, labels, ref_x, ref_labels)
