"""pml_rll.retrieval"""

from __future__ import annotations

from .namr_rerank_knn import NAMRReRankKNN  # noqa: E402,F401
from .structure_weighted_distance import StructureWeightedDistance  # noqa: E402,F401
