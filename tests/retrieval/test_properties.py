"""Property tests of NAMR retrieval: for random finite input of any magnitude the indices are valid gallery rows,
the distances are never NaN and come sorted, and the ranking is that of the same input scaled to unit size."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pml_rll.retrieval import NAMRReRankKNN, StructureWeightedDistance

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


@st.composite
def searches(draw):
    """(query, reference, k, x exponent): packed queries and a sample-part gallery, x scaled by 2**e_x and each
    query's s by its own random power of two."""
    d, nq, nr = draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(2, 12))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    e_x = draw(st.integers(-100, 100))
    x = torch.randn(nq + nr, d, generator=g, dtype=torch.float64)
    s = 0.5 + torch.rand(nq, d, generator=g, dtype=torch.float64)
    s = s * 2.0 ** torch.randint(-100, 100, (nq, 1), generator=g, dtype=torch.float64)
    query = torch.cat([x[:nq], s], 1)
    k = draw(st.integers(1, nr))
    return query, x[nq:], k, e_x


@SETTINGS
@given(case=searches(), mode=st.sampled_from(["rerank", "exhaustive"]), dtype=st.sampled_from(["float32", "float64"]))
def test_finite_input_gives_valid_indices_and_no_nan(case, mode, dtype):
    query, reference, k, e_x = case
    dtype = getattr(torch, dtype)
    d = reference.shape[1]
    knn = NAMRReRankKNN(d, num_candidates=3, mode=mode)
    dist, idx = knn(query.to(dtype), k, reference.to(dtype))
    scaled_q = torch.cat([query[:, :d] * 2.0**e_x, query[:, d:]], 1).to(dtype)
    if torch.isfinite(scaled_q).all() and torch.isfinite(reference * 2.0**e_x).all():
        dist_s, idx_s = knn(scaled_q, k, (reference * 2.0**e_x).to(dtype))
        assert torch.equal(idx_s, idx)  # the ranking does not depend on the magnitude
        assert not torch.isnan(dist_s).any() and (dist_s[:, 1:] >= dist_s[:, :-1]).all()
    assert idx.shape == (query.shape[0], k) and ((idx >= 0) & (idx < reference.shape[0])).all()
    assert not torch.isnan(dist).any() and (dist >= 0).all() and (dist[:, 1:] >= dist[:, :-1]).all()


@SETTINGS
@given(case=searches())
def test_structure_weighted_distance_has_no_nan(case):
    query, reference, _, e_x = case
    d = reference.shape[1]
    q = torch.cat([query[:, :d] * 2.0**e_x, query[:, d:]], 1).float()
    r = (reference * 2.0**e_x).float()
    if torch.isfinite(q).all() and torch.isfinite(r).all():
        mat = StructureWeightedDistance(d)(q, r)
        assert mat.shape == (query.shape[0], reference.shape[0])
        assert not torch.isnan(mat).any() and (mat >= 0).all()
