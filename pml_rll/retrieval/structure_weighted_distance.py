"""StructureWeightedDistance: the query-weighted squared distance of NAMR as a PML distance."""

from __future__ import annotations

import torch
from pytorch_metric_learning.distances import BaseDistance

from ..functional import namr as F_namr
from ..utils.validation import check_int, check_packed, check_reference, check_same_device
from .namr_rerank_knn import _rescaled


class StructureWeightedDistance(BaseDistance):
    """``d_w(q, j) = sum_k s_qk (x_qk - x_jk)^2`` between packed queries and references (docs/namr.md, section 5.2).

    Paper: NAMR/NASA retrieval re-ranks by the *query's* structure embedding; references contribute only
    their sample embeddings x. Here every reference is scored (exhaustive ranking); use
    :class:`~pml_rll.retrieval.NAMRReRankKNN` for the index-friendly two-stage version. Queries must be
    packed ``[x || s]`` (width 2d); references may be packed or sample-only (width d).

    Not symmetric and not a metric: do not use it inside training losses. Never normalises (the packed
    vector must not be L2-normalised).

    Bad input (see :mod:`pml_rll.utils.validation`): queries must be packed, finite, with a strictly positive
    structure part, references finite, both floating point on one device; a NaN or infinite row raises a
    ``ValueError`` naming the argument and the row (rather than making distances NaN). Magnitudes whose squared
    distances would overflow or underflow are rescaled by an exact power of two as in ``NAMRReRankKNN``.

    Args:
        embedding_size: d.
        **kwargs: passed to ``BaseDistance`` (``normalize_embeddings`` must stay False).
    """

    def __init__(self, embedding_size: int, **kwargs):
        embedding_size = check_int("embedding_size", embedding_size)
        if kwargs.get("normalize_embeddings", False):
            raise ValueError("StructureWeightedDistance needs normalize_embeddings=False (packed embeddings)")
        kwargs["normalize_embeddings"] = False
        super().__init__(**kwargs)
        self.embedding_size = embedding_size

    def _ref_sample(self, ref_emb: torch.Tensor) -> torch.Tensor:
        return F_namr.sample_part(ref_emb, self.embedding_size, "reference")

    def check_shapes(self, query_emb, ref_emb):
        """Raise a ``ValueError`` naming the argument unless the query is packed and the reference well formed."""
        check_packed("query_emb", query_emb, self.embedding_size)
        if ref_emb is not None:
            check_reference("ref_emb", ref_emb, self.embedding_size)
            check_same_device("ref_emb", ref_emb, query_emb, "query_emb")

    def forward(self, query_emb, ref_emb=None):
        """PML's distance call: the (Q, R) structure-weighted squared distances (reference: the query by default)."""
        # checked before BaseDistance resets the statistics: a rejected call changes nothing
        self.check_shapes(query_emb, ref_emb)
        return super().forward(query_emb, ref_emb)

    def compute_mat(self, query_emb, ref_emb):
        """PML's hook: ``sum_k s_qk (x_qk - x_rk)^2`` for every query row q and reference row r."""
        qx, qs = F_namr.split_packed(query_emb, self.embedding_size)
        rx = self._ref_sample(ref_emb).to(qx.dtype)
        qx, rx, qs, unscale = _rescaled(qx, rx, qs)
        return F_namr.structure_weighted_sq_distance(qx, qs, rx) * unscale

    def pairwise_distance(self, query_emb, ref_emb):
        """The structure-weighted squared distance of each query row to the reference row of the same index, (N,)."""
        self.check_shapes(query_emb, ref_emb)
        qx, qs = F_namr.split_packed(query_emb, self.embedding_size)
        rx = self._ref_sample(ref_emb).to(qx.dtype)
        if rx.shape[0] != qx.shape[0]:
            raise ValueError(f"ref_emb must have {qx.shape[0]} rows like query_emb, got {rx.shape[0]}")
        return (qs * (qx - rx) ** 2).sum(1)
