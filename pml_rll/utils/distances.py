"""Which PML distances the Euclidean paths of :mod:`pml_rll.functional` compute themselves."""

from __future__ import annotations

from pytorch_metric_learning.distances import BaseDistance, LpDistance


def is_fast_distance(distance: BaseDistance) -> bool:
    """Whether ``distance`` is exactly PML's ``LpDistance(p=2, power=1)`` (a subclass may change the computation),
    with or without ``normalize_embeddings``: the Euclidean distance that ``RankedListLoss`` and
    ``RankedListMiner`` compute themselves in Gram form, near-duplicate pairs from explicit differences
    (:mod:`pml_rll.functional.numerics`). Any other distance is called as PML calls it."""
    return type(distance) is LpDistance and distance.p == 2 and distance.power == 1
