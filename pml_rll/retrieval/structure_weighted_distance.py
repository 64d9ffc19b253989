"""StructureWeightedDistance: the query-weighted squared distance of NAMR as a PML distance."""

from __future__ import annotations

import torch
from pytorch_metric_learning.distances import BaseDistance

from ..functional import namr as F_namr


class StructureWeightedDistance(BaseDistance):
    """``d_w(q, j) = sum_k s_qk (x_qk - x_jk)^2`` between packed queries and references (docs/namr.md, section 5.2).

    Paper: NAMR/NASA retrieval re-ranks by the *query's* structure embedding; references contribute only
    their sample embeddings x. Here every reference is scored (exhaustive ranking); use
    :class:`~pml_rll.retrieval.NAMRReRankKNN` for the index-friendly two-stage version. Queries must be
    packed ``[x || s]`` (width 2d); references may be packed or sample-only (width d).

    Not symmetric and not a metric: do not use it inside training losses. Never normalises (the packed
    vector must not be L2-normalised).

    Args:
        embedding_size: d.
        **kwargs: passed to ``BaseDistance`` (``normalize_embeddings`` must stay False).
    """

    def __init__(self, embedding_size: int, **kwargs):
        if kwargs.get("normalize_embeddings", False):
            raise ValueError("StructureWeightedDistance needs normalize_embeddings=False (packed embeddings)")
        kwargs["normalize_embeddings"] = False
        super().__init__(**kwargs)
        if not isinstance(embedding_size, int) or isinstance(embedding_size, bool) or embedding_size < 1:
            raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
        self.embedding_size = embedding_size

    def _ref_sample(self, ref_emb: torch.Tensor) -> torch.Tensor:
        return F_namr.sample_part(ref_emb, self.embedding_size, "reference")

    def check_shapes(self, query_emb, ref_emb):
        F_namr.split_packed(query_emb, self.embedding_size)
        if ref_emb is not None:
            self._ref_sample(ref_emb)

    def compute_mat(self, query_emb, ref_emb):
        qx, qs = F_namr.split_packed(query_emb, self.embedding_size)
        return F_namr.structure_weighted_sq_distance(qx, qs, self._ref_sample(ref_emb))

    def pairwise_distance(self, query_emb, ref_emb):
        qx, qs = F_namr.split_packed(query_emb, self.embedding_size)
        rx = self._ref_sample(ref_emb)
        return (qs * (qx - rx) ** 2).sum(1)
