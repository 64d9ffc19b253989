"""NAMRReRankKNN re-ranking variants: symmetric weighting and blends with the plain distance (loop references)."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.utils.inference import CustomKNN

from pml_rll.retrieval import NAMRReRankKNN
from tests.reference import namr as ref

D = 4


def _packed(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    return torch.cat([x, 0.5 + torch.rand(n, D, generator=g, dtype=torch.float64)], 1)


def _knn(**kwargs):
    return NAMRReRankKNN(D, base_knn=CustomKNN(LpDistance(normalize_embeddings=False)), **kwargs)


def _loop_order(query, reference, symmetric, blend):
    out = []
    for i in range(len(query)):
        scores = []
        for j in range(len(reference)):
            if i == j:
                continue
            rs = reference[j, D:] if symmetric else None
            scores.append((ref.rerank_sq_distance(query[i, :D], query[i, D:], reference[j, :D], rs, blend), j))
        out.append([j for _, j in sorted(scores)])
    return torch.tensor(out)


@pytest.mark.parametrize("weighting, blend", [("symmetric", 1.0), ("symmetric", 0.5), ("query", 0.25)])
def test_variants_with_every_candidate_equal_exhaustive_loop_ranking(weighting, blend):
    query = _packed(8, seed=0)
    reference = torch.cat([query, _packed(14, seed=1)])
    want = _loop_order(query, reference, weighting == "symmetric", blend)
    n = len(reference) - 1
    dist, idx = _knn(num_candidates=n, weighting=weighting, blend=blend)(query, n, reference, True)
    assert torch.equal(idx, want)
    j = int(idx[2, 0])
    rs = reference[j, D:] if weighting == "symmetric" else None
    assert dist[2, 0].item() == pytest.approx(
        ref.rerank_sq_distance(query[2, :D], query[2, D:], reference[j, :D], rs, blend), rel=1e-10
    )
    _, ie = _knn(mode="exhaustive", weighting=weighting, blend=blend)(query, 5, reference, True)
    assert torch.equal(ie, want[:, :5])


def test_blend_zero_is_the_plain_order():
    query = _packed(10, seed=2)
    reference = torch.cat([query, _packed(10, seed=3)])
    _, plain = _knn(mode="plain")(query, 6, reference, True)
    _, blended = _knn(num_candidates=19, blend=0.0)(query, 6, reference, True)
    assert torch.equal(plain, blended)


def test_symmetric_needs_packed_references_and_stores_them():
    query = _packed(6, seed=4)
    reference = _packed(9, seed=5)
    knn = _knn(num_candidates=9, weighting="symmetric")
    with pytest.raises(ValueError, match="symmetric"):
        knn(query, 3, reference[:, :D])
    _, want = knn(query, 3, reference)
    knn.train(reference[:4])
    knn.add(reference[4:])
    _, got = knn(query, 3)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="mix"):
        knn.add(reference[:2, :D])
    # the query weighting only needs the references' sample embeddings
    _, a = _knn(num_candidates=9)(query, 3, reference[:, :D])
    _, b = _knn(num_candidates=9)(query, 3, reference)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, error",
    [({"weighting": "mean"}, ValueError), ({"blend": 1.5}, ValueError), ({"blend": -0.1}, ValueError)]
    + [({"blend": True}, TypeError)],
)
def test_bad_variant_arguments_raise(kwargs, error):
    name = next(iter(kwargs))
    with pytest.raises(error, match=name):
        NAMRReRankKNN(D, **kwargs)
