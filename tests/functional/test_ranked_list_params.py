"""RankedListParams: one frozen object, resolved alpha, keyword-only use in the functional core."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pml_rll.functional.ranked_list import non_trivial_pairs, ranked_lists
from pml_rll.functional.ranked_list_euclidean import ranked_list_euclidean
from pml_rll.functional.ranked_list_params import RankedListParams


def test_alpha_resolved_and_floats():
    p = RankedListParams(margin=1, Tn=10)
    assert p.alpha == 1.5 and p.negative_boundary == 1.5 and p.positive_boundary == 0.5
    assert all(type(getattr(p, f.name)) is float for f in dataclasses.fields(p))
    assert RankedListParams(margin=0.4, alpha=1.0).positive_boundary == pytest.approx(0.6)


def test_frozen():
    p = RankedListParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.Tn = 1.0  # type: ignore[misc]


def test_core_takes_params_by_keyword_only():
    h, q = torch.ones(2), torch.zeros(2, dtype=torch.long)
    with pytest.raises(TypeError):
        ranked_lists(h, q, h, q, 1, RankedListParams(), True)  # type: ignore[misc]
    with pytest.raises(TypeError):
        non_trivial_pairs(torch.ones(2, 2), torch.eye(2).bool(), ~torch.eye(2).bool(), 1.2, 0.4)  # type: ignore[misc]
    x = torch.randn(4, 3)
    with pytest.raises(TypeError):
        ranked_list_euclidean(x, None, None, RankedListParams(), True)  # type: ignore[misc,arg-type]
    with pytest.raises(ValueError, match="path"):
        ranked_list_euclidean(x, None, None, params=RankedListParams(), paper=True, path="fast")  # type: ignore[arg-type]
