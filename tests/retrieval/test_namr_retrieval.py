"""NAMRReRankKNN and StructureWeightedDistance (docs/namr.md, section 5)."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN

from pml_rll.retrieval import NAMRReRankKNN, StructureWeightedDistance
from pml_rll.retrieval.namr_rerank_knn import _HAS_FAISS
from tests.conftest import sample_and_structure
from tests.reference import namr as ref

D = 5


def _packed(n, seed, dtype=torch.float64, s_one=False):
    return torch.cat(sample_and_structure(n, D, seed, dtype, s_one=s_one), 1)


def _exact_knn():
    return CustomKNN(LpDistance(normalize_embeddings=False))


def _loop_ranking(query, reference, exclude_self, weighted):
    """Full ranking of every reference for every query, by loops (float64)."""
    out = []
    for i in range(len(query)):
        qx, qs = query[i, :D], query[i, D:]
        scores = []
        for j in range(len(reference)):
            if exclude_self and i == j:
                continue
            rx = reference[j, :D]
            dist = ref.weighted_sq_distance(qx, qs, rx) if weighted else ref.euclidean_sq(qx, rx)
            scores.append((dist, j))
        out.append([j for _, j in sorted(scores)])
    return torch.tensor(out)


@pytest.mark.parametrize("ref_includes_query", [True, False])
def test_full_candidate_list_equals_exhaustive_weighted_ranking(ref_includes_query):
    query = _packed(12, seed=0)
    reference = torch.cat([query, _packed(20, seed=1)]) if ref_includes_query else _packed(30, seed=1)
    available = len(reference) - int(ref_includes_query)
    want = _loop_ranking(query, reference, ref_includes_query, weighted=True)
    knn = NAMRReRankKNN(D, num_candidates=available, base_knn=_exact_knn())
    dist, idx = knn(query, available, reference, ref_includes_query)
    assert torch.equal(idx, want)
    assert torch.all(dist[:, 1:] >= dist[:, :-1])
    # returned distances are the structure-weighted squared distances
    j = int(idx[3, 0])
    assert dist[3, 0].item() == pytest.approx(
        ref.weighted_sq_distance(query[3, :D], query[3, D:], reference[j, :D]), rel=1e-12
    )
    # top-k prefix, and the exhaustive mode, agree
    d5, i5 = NAMRReRankKNN(D, num_candidates=available, base_knn=_exact_knn())(query, 5, reference, ref_includes_query)
    assert torch.equal(i5, want[:, :5])
    de, ie = NAMRReRankKNN(D, mode="exhaustive")(query, 5, reference, ref_includes_query)
    assert torch.equal(ie, want[:, :5])
    torch.testing.assert_close(de, d5, rtol=1e-10, atol=1e-12)
    # and the PML distance object gives the same matrix as the loop reference
    mat = StructureWeightedDistance(D)(query, reference)
    for a in (0, 7):
        for b in (0, 5, 11):
            assert mat[a, b].item() == pytest.approx(
                ref.weighted_sq_distance(query[a, :D], query[a, D:], reference[b, :D]), rel=1e-10, abs=1e-12
            )


def test_unit_structure_gives_the_euclidean_order():
    query = _packed(15, seed=2, s_one=True)
    reference = torch.cat([query, _packed(25, seed=3, s_one=True)])
    euclid = _loop_ranking(query, reference, True, weighted=False)
    for kc in (4, 10, 39):
        _, idx = NAMRReRankKNN(D, num_candidates=kc, base_knn=_exact_knn())(query, 4, reference, True)
        assert torch.equal(idx, euclid[:, :4])
    _, plain = NAMRReRankKNN(D, mode="plain", base_knn=_exact_knn())(query, 6, reference, True)
    assert torch.equal(plain, euclid[:, :6])
    # plain mode ignores s entirely
    _, plain_s = NAMRReRankKNN(D, mode="plain", base_knn=_exact_knn())(_packed(15, seed=2), 6, reference, True)
    assert torch.equal(plain_s, plain)


def test_rerank_only_permutes_the_candidates_and_excludes_self():
    query = _packed(40, seed=4)
    reference = torch.cat([query, _packed(60, seed=5)])
    kc = 8
    _, plain = NAMRReRankKNN(D, mode="plain", base_knn=_exact_knn())(query, kc, reference, True)
    _, rer = NAMRReRankKNN(D, num_candidates=kc, base_knn=_exact_knn())(query, kc, reference, True)
    assert torch.equal(torch.sort(plain, 1).values, torch.sort(rer, 1).values)  # same sets: R@K_c unchanged
    assert not torch.equal(plain, rer)  # but a different order
    self_idx = torch.arange(40).unsqueeze(1)
    assert not (rer == self_idx).any() and not (plain == self_idx).any()
    # with k < K_c: top-k of the re-ranked candidates, never outside the Euclidean top K_c
    _, top3 = NAMRReRankKNN(D, num_candidates=kc, base_knn=_exact_knn())(query, 3, reference, True)
    assert torch.equal(top3, rer[:, :3])
    # R@K_c through AccuracyCalculator: identical to the plain one
    labels = torch.randint(0, 5, (100,), generator=torch.Generator().manual_seed(0))
    qlab = labels[:40]
    rlab = torch.cat([qlab, labels[40:]])
    for k in (kc,):
        hits = [(rlab[idx] == qlab.unsqueeze(1)).any(1).float().mean() for idx in (plain[:, :k], rer[:, :k])]
        assert hits[0] == hits[1]


def test_output_format_matches_custom_knn():
    query = _packed(10, seed=6, dtype=torch.float32)
    reference = torch.cat([query, _packed(20, seed=7, dtype=torch.float32)])
    base_d, base_i = _exact_knn()(query[:, :D], 4, reference[:, :D], True)
    for mode in NAMRReRankKNN.MODES:
        d, i = NAMRReRankKNN(D, num_candidates=6, base_knn=_exact_knn(), mode=mode)(query, 4, reference, True)
        assert d.shape == base_d.shape and i.shape == base_i.shape
        assert i.dtype == base_i.dtype == torch.int64 and d.dtype == torch.float32


@pytest.mark.skipif(not _HAS_FAISS, reason="faiss not installed")
def test_default_faiss_candidates_match_exact_search():
    query = _packed(30, seed=8, dtype=torch.float32)
    reference = torch.cat([query, _packed(50, seed=9, dtype=torch.float32)])
    _, idx_faiss = NAMRReRankKNN(D, num_candidates=10)(query, 5, reference, True)
    _, idx_exact = NAMRReRankKNN(D, num_candidates=10, base_knn=_exact_knn())(query, 5, reference, True)
    assert torch.equal(idx_faiss, idx_exact)


def test_sample_only_reference_and_inference_model_style_use():
    query = _packed(10, seed=10)
    gallery = _packed(30, seed=11)
    knn = NAMRReRankKNN(D, num_candidates=12, base_knn=_exact_knn())
    d_packed, i_packed = knn(query, 5, gallery, False)
    d_x, i_x = knn(query, 5, gallery[:, :D], False)  # the index only needs x
    assert torch.equal(i_packed, i_x)
    knn.train(gallery[:20])
    knn.add(gallery[20:])
    _, i_stored = knn(query, 5)
    assert torch.equal(i_stored, i_packed)
    knn.reset()
    with pytest.raises(ValueError, match="no reference was stored"):
        knn(query, 5)


def test_works_inside_accuracy_calculator():
    g = torch.Generator().manual_seed(12)
    labels = torch.arange(60) // 6
    x = torch.randn(10, D, generator=g, dtype=torch.float64)[labels] + 0.8 * torch.randn(
        60, D, generator=g, dtype=torch.float64
    )
    s = 0.5 + torch.rand(60, D, generator=g, dtype=torch.float64)
    packed = torch.cat([x, s], 1)
    results = {}
    for mode in ("plain", "rerank"):
        calc = AccuracyCalculator(
            include=("precision_at_1", "mean_average_precision"),
            k=5,
            knn_func=NAMRReRankKNN(D, num_candidates=5, base_knn=_exact_knn(), mode=mode),
        )
        results[mode] = calc.get_accuracy(packed, labels)
        assert 0.0 <= results[mode]["precision_at_1"] <= 1.0
    # P@1 of the plain mode equals a direct Euclidean 1-NN on x
    nn = _loop_ranking(packed, packed, True, weighted=False)[:, 0]
    assert results["plain"]["precision_at_1"] == pytest.approx((labels[nn] == labels).double().mean().item())


def test_argument_errors():
    with pytest.raises(ValueError, match="mode"):
        NAMRReRankKNN(D, mode="fast")
    with pytest.raises(ValueError, match="num_candidates"):
        NAMRReRankKNN(D, num_candidates=0)
    knn = NAMRReRankKNN(D, base_knn=_exact_knn())
    q = _packed(5, seed=13)
    with pytest.raises(ValueError, match="width 2 \\* embedding_size"):
        knn(q[:, :D], 2, q, True)
    with pytest.raises(ValueError, match="reference must have width"):
        knn(q, 2, torch.randn(5, 7, dtype=torch.float64), False)
    with pytest.raises(ValueError, match="exceeds"):
        knn(q, 5, q, True)
    with pytest.raises(ValueError, match="normalize_embeddings=False"):
        StructureWeightedDistance(D, normalize_embeddings=True)


def test_warns_when_the_packed_vector_was_normalised():
    q = _packed(12, seed=14)
    knn = NAMRReRankKNN(D, base_knn=_exact_knn())
    with pytest.warns(UserWarning, match="normalize_embeddings=False"):
        knn(torch.nn.functional.normalize(q, dim=1), 3, torch.nn.functional.normalize(q, dim=1), True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        knn(q, 3, q, True)


def test_normalize_sample_ranks_in_cosine_geometry():
    # with normalize_sample, plain mode is the Euclidean order of the L2-normalised x (a loop reference)
    g = torch.Generator().manual_seed(7)
    d = 5
    x = torch.randn(30, d, generator=g, dtype=torch.float64) * (
        1 + 3 * torch.rand(30, 1, generator=g, dtype=torch.float64)
    )
    s = 0.5 + torch.rand(30, d, generator=g, dtype=torch.float64)
    packed = torch.cat([x, s], 1)
    e = x / x.norm(dim=1, keepdim=True)
    for i in range(30):
        dists = [(float(((e[i] - e[j]) ** 2).sum()), j) for j in range(30) if j != i]
        expected = [j for _, j in sorted(dists)[:4]]
        knn = NAMRReRankKNN(
            d, mode="plain", normalize_sample=True, base_knn=CustomKNN(LpDistance(normalize_embeddings=False))
        )
        _, idx = knn(packed[i : i + 1], 4, torch.cat([packed[i : i + 1], packed[torch.arange(30) != i]]), True)
        others = [j for j in range(30) if j != i]
        assert [others[k - 1] for k in idx[0].tolist()] == expected
