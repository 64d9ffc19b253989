"""pml_rll.retrieval: NAMR's re-ranking kNN and structure-weighted distance.

Build the retrieval of a trained ``NAMRLoss`` with ``NAMRReRankKNN.for_loss(loss)`` (the validated settings in the
loss's geometry); ``pml_rll.losses.validated_retrieval`` gives those settings for a base loss by name.
"""

from __future__ import annotations

from .namr_rerank_knn import NAMRReRankKNN  # noqa: E402,F401
from .structure_weighted_distance import StructureWeightedDistance  # noqa: E402,F401
