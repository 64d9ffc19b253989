"""Bad input to the NAMR retrieval classes: a TypeError/ValueError that names the argument; a NaN gallery row or
query never poisons the ranking, and finite input never gives -1 indices or NaN distances."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pml_rll.retrieval import NAMRReRankKNN, StructureWeightedDistance

D = 3
NAN = float("nan")
G = torch.Generator().manual_seed(0)
Q = torch.cat([torch.randn(5, D, generator=G), 0.5 + torch.rand(5, D, generator=G)], 1)
R = torch.randn(12, D, generator=G)


def _with(t, row, col, value):
    t = t.clone()
    t[row, col] = value
    return t


BAD_CONSTRUCTION = [
    ("knn size 0", lambda: NAMRReRankKNN(0), ValueError, "embedding_size"),
    ("knn size numpy float", lambda: NAMRReRankKNN(np.float32(3)), TypeError, "embedding_size"),
    ("knn candidates 0", lambda: NAMRReRankKNN(D, num_candidates=0), ValueError, "num_candidates"),
    ("knn candidates float", lambda: NAMRReRankKNN(D, num_candidates=2.5), TypeError, "num_candidates"),
    ("knn mode", lambda: NAMRReRankKNN(D, mode="fast"), ValueError, "mode"),
    ("knn mode None", lambda: NAMRReRankKNN(D, mode=None), ValueError, "mode"),
    ("knn base_knn", lambda: NAMRReRankKNN(D, base_knn=3), TypeError, "base_knn"),
    ("knn normalize str", lambda: NAMRReRankKNN(D, normalize_sample="no"), TypeError, "normalize_sample"),
    ("swd size 0", lambda: StructureWeightedDistance(0), ValueError, "embedding_size"),
    ("swd size bool", lambda: StructureWeightedDistance(True), TypeError, "embedding_size"),
    ("swd normalize", lambda: StructureWeightedDistance(D, normalize_embeddings=True), ValueError, "normalize"),
]


def test_bad_construction(bad_construction, rejects):
    rejects(*bad_construction)


# (id, call arguments, exception, argument named)
BAD_KNN_CALLS = [
    ("query nan", (_with(Q, 0, 0, NAN), 2, R), ValueError, "query"),
    ("query s nan", (_with(Q, 0, D, NAN), 2, R), ValueError, "query"),
    ("query s zero", (_with(Q, 1, D, 0.0), 2, R), ValueError, "query"),
    ("query s negative", (_with(Q, 4, D + 2, -2.0), 2, R), ValueError, "strictly positive"),
    ("query width", (Q[:, :D], 2, R), ValueError, "query"),
    ("query int", (Q.long(), 2, R), TypeError, "query"),
    ("query list", (Q.tolist(), 2, R), TypeError, "query"),
    ("k zero", (Q, 0, R), ValueError, "k"),
    ("k float", (Q, 2.0, R), TypeError, "k"),
    ("k bool", (Q, True, R), TypeError, "k"),
    ("k too large", (Q, 13, R), ValueError, "k="),
    ("reference nan row", (Q, 2, _with(R, 7, 1, NAN)), ValueError, "reference"),
    ("reference inf row", (Q, 2, _with(R, 0, 2, float("inf"))), ValueError, "reference"),
    ("reference width", (Q, 2, torch.randn(12, D + 1)), ValueError, "reference"),
    ("reference int", (Q, 2, R.long()), TypeError, "reference"),
    ("ref_includes_query str", (Q, 2, R, "yes"), TypeError, "ref_includes_query"),
]


@pytest.mark.parametrize("mode", NAMRReRankKNN.MODES)
@pytest.mark.parametrize("case", BAD_KNN_CALLS, ids=[c[0] for c in BAD_KNN_CALLS])
def test_bad_knn_calls(case, mode, rejects):
    _, args, exc, name = case
    knn = NAMRReRankKNN(D, num_candidates=4, mode=mode)
    knn.train(R)
    rejects(lambda: knn(*args), exc, name, obj=knn)


def test_a_non_finite_gallery_is_refused_where_it_is_given(rejects):
    knn = NAMRReRankKNN(D, mode="exhaustive")
    rejects(lambda: knn.train(_with(R, 3, 0, NAN)), ValueError, "row 3", obj=knn)
    assert knn.reference_x is None
    knn.train(R)
    rejects(lambda: knn.add(_with(R, 5, 2, float("inf"))), ValueError, "embeddings", obj=knn)
    rejects(lambda: knn.add(R.tolist()), TypeError, "embeddings", obj=knn)
    assert knn.reference_x.shape == (12, D)
    dist, idx = knn(Q, 3)
    assert torch.isfinite(dist).all() and ((idx >= 0) & (idx < 12)).all()
    assert len(set(map(tuple, idx.tolist()))) > 1  # not every query with the same top-k


def test_no_minus_one_and_no_nan_for_finite_extreme_magnitudes():
    """Squared distances that overflow (x ~ 1e20) or underflow (x ~ 1e-25) in float32: the ranking is still the
    ranking of the unscaled input, indices are valid, distances are never NaN."""
    expected = {mode: NAMRReRankKNN(D, num_candidates=4, mode=mode)(Q, 3, R) for mode in ("rerank", "exhaustive")}
    for scale in (1e20, 1e-25):
        q = torch.cat([Q[:, :D] * scale, Q[:, D:]], 1)
        for mode, (_, idx) in expected.items():
            dist, got = NAMRReRankKNN(D, num_candidates=4, mode=mode)(q, 3, R * scale)
            assert torch.equal(got, idx), (mode, scale)
            assert not torch.isnan(dist).any()
    s_big = torch.cat([Q[:, :D], Q[:, D:] * 1e36], 1)
    dist, got = NAMRReRankKNN(D, mode="exhaustive")(s_big, 3, R)
    assert torch.equal(got, expected["exhaustive"][1]) and not torch.isnan(dist).any()


def test_plain_mode_never_returns_minus_one(rejects):
    knn = NAMRReRankKNN(D, mode="plain")
    q = torch.cat([Q[:, :D] * 1e20, Q[:, D:]], 1)
    try:
        _, idx = knn(q, 3, R * 1e20)
    except ValueError as e:
        assert "base_knn" in str(e)
    else:
        assert ((idx >= 0) & (idx < 12)).all()


BAD_DISTANCE_CALLS = [
    ("query nan", (_with(Q, 2, 1, NAN), R), ValueError, "query_emb"),
    ("query s zero", (_with(Q, 2, D + 1, 0.0), R), ValueError, "query_emb"),
    ("query width", (Q[:, 1:], R), ValueError, "query_emb"),
    ("ref nan", (Q, _with(R, 4, 0, NAN)), ValueError, "ref_emb"),
    ("ref width", (Q, torch.randn(4, D + 2)), ValueError, "ref_emb"),
    ("ref int", (Q, R.int()), TypeError, "ref_emb"),
]


@pytest.mark.parametrize("case", BAD_DISTANCE_CALLS, ids=[c[0] for c in BAD_DISTANCE_CALLS])
def test_bad_distance_calls(case, rejects):
    _, args, exc, name = case
    dist = StructureWeightedDistance(D, collect_stats=True)
    dist(Q, R)
    rejects(lambda: dist(*args), exc, name, obj=dist)
    rejects(lambda: dist.pairwise_distance(*args), exc, name, obj=dist)


def test_a_reference_of_another_dtype_is_cast():
    dist = StructureWeightedDistance(D)
    torch.testing.assert_close(dist(Q, R.half()), dist(Q, R.half().float()))
