"""RankedListLoss against the hand-checkable cases of docs/ranked_list_loss.md (section 4) and a loop reference."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance

from pml_rll.functional.ranked_list import hinge_gradients, ranked_lists
from pml_rll.functional.ranked_list_params import RankedListParams
from pml_rll.losses import RankedListLoss
from tests.conftest import F64, hand_case, paired_batch
from tests.reference.ranked_list_loss import reference_loss, reference_losses, reference_paper_gradient

# ---- docs/ranked_list_loss.md, section 4: hand cases (convex 0.5 = PML's default convention) ----------------


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize(
    "angles,labels,kw,expected",
    [
        ([0, 60, 90, 180], [0, 0, 1, 1], dict(Tn=10), 0.3741439),  # case 1
        ([0, 70, 30, 50, 120], [0, 0, 1, 1, 1], dict(Tn=0), 0.4787052),  # case 2, Tn = 0
        ([0, 70, 30, 50, 120], [0, 0, 1, 1, 1], dict(Tn=10), 0.5504989),  # case 2, Tn = 10
        ([0, 70, 30, 50, 120], [0, 0, 1, 1, 1], dict(Tn=10, Tp=5), 0.5582895),  # case 2, Tp = 5
        ([0, 40, 200], [0, 1, 1], dict(Tn=10), (0.515960 + 1.685575 + 1.169616) / 6),  # case 3
        ([0, 10, 180, 190], [0, 0, 1, 1], dict(Tn=10), 0.0),  # case 4
        ([0, 0, 90, 180], [0, 1, 0, 1], dict(Tn=10), 0.7535534),  # case 5: d = 0 negative counts
        ([0, 0, 180], [0, 0, 1], dict(Tn=10, alpha=0.3), 0.1 / 3),  # case 5b: alpha < m
        ([0, 70, 30, 50, 120], [0, 0, 1, 1, 1], dict(Tn=100), 0.5561250),  # case 6
        ([0, 70, 10], [0, 0, 1], dict(Tn=100), 0.4909471),  # case 6b (PML: NaN in float32)
    ],
)
def test_hand_cases(angles, labels, kw, expected, dtype, tol):
    x, y = hand_case(angles, labels, dtype)
    loss = RankedListLoss(margin=0.4, **kw)(x, y)
    assert loss.item() == pytest.approx(expected, abs=tol)


def test_case1_per_query_cvpr_values():
    x, y = hand_case([0, 60, 90, 180], [0, 0, 1, 1])
    # imbalance 0.5 is half the CVPR per-query value L_P + L_N
    expected = [0.2, 0.882362, 1.296575, 0.614214]
    got = reference_losses(x, y.tolist(), Tn=10)
    assert [2 * float(v) for v in got] == pytest.approx(expected, abs=1e-6)
    loss = RankedListLoss(0.4, Tn=10, reducer=None)
    assert 2 * loss(x, y).item() == pytest.approx(sum(expected) / 4, abs=1e-6)


def test_case5_per_query_and_zero_distance_gradient_is_finite():
    x, y = hand_case([0, 0, 90, 180], [0, 1, 0, 1])
    x.requires_grad_(True)
    for gradient in ("paper", "autograd"):
        loss = RankedListLoss(0.4, Tn=10, gradient=gradient)(x, y)
        assert 2 * loss.item() == pytest.approx(1.5071068, abs=1e-6)
        (g,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(g).all()


def test_case7_scale_invariance():
    x, y = hand_case([0, 70, 30, 50, 120], [0, 0, 1, 1, 1])
    assert RankedListLoss(0.4, Tn=10)(3 * x, y).item() == pytest.approx(0.5504989, abs=1e-6)


# ---- docs/ranked_list_loss.md, case 8: the two gradient rules -----------------------------------------------

CASE8_A = [(0, 0.033518), (-0.052335, 0.019048), (0.162930, -0.282203), (-0.073574, 0.061736), (-0.121766, -0.070302)]
CASE8_C = [(0, 0.014460), (0.014252, -0.005187), (0.068481, -0.118612), (-0.011700, 0.009818), (0.012400, 0.007159)]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 2e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize("gradient,expected", [("autograd", CASE8_A), ("paper", CASE8_C)])
def test_case8_gradients(gradient, expected, dtype, tol):
    x, y = hand_case([0, 70, 30, 50, 120], [0, 0, 1, 1, 1], dtype)
    x.requires_grad_(True)
    loss = RankedListLoss(0.4, Tn=10, gradient=gradient)(x, y)
    (g,) = torch.autograd.grad(loss, x)
    assert torch.allclose(g.double(), torch.tensor(expected, dtype=F64), atol=tol)


def test_case8c_paper_gradient_pushes_every_negative_away():
    # query 0 of case 2: negatives at d = 0.517638 and 0.845237, Tn = 10; L_N only (imbalance = 1)
    h_n = 1.2 - torch.tensor([0.517638, 0.845237], dtype=F64)
    q_n = torch.zeros(2, dtype=torch.long)
    h_p, q_p = h_n[:0], q_n[:0]

    def dloss_dd(detach):
        params = RankedListParams(Tp=0.0, Tn=10.0, imbalance=1.0)
        r = ranked_lists(h_p, q_p, h_n, q_n, 1, params=params, detach_weights=True)
        return -hinge_gradients(r, h_p, q_p, h_n, q_n, params=params, detach_weights=detach)[1][None]

    paper, auto = dloss_dd(True), dloss_dd(False)
    assert paper[0].tolist() == pytest.approx([-0.9636, -0.0364], abs=1e-4)
    assert auto[0].tolist() == pytest.approx([-1.0785, 0.0785], abs=1e-4)
    assert (paper < 0).all()  # descent increases every non-trivial negative distance


def test_paper_gradient_moves_queries_away_from_all_negatives():
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(24, 6, dtype=F64), dim=1).requires_grad_(True)
    y = torch.arange(24) % 4
    loss = RankedListLoss(0.4, Tn=30, gradient="paper", reducer=None)
    (g,) = torch.autograd.grad(loss(x, y), x)
    # each query's gradient, taken alone, is the sum of its own pair terms: a small descent step on query i
    # with every other point fixed must not bring any non-trivial negative of i closer
    e = x.detach()
    for i in range(24):
        moved = torch.nn.functional.normalize(e[i] - 1e-4 * g[i], dim=0)
        before = (e[i] - e).norm(dim=1)
        after = (moved - e).norm(dim=1)
        neg = (y != y[i]) & (before < 1.2)
        big = before[neg] > 0
        # first-order: the negative-set weighted mean distance grows
        w = torch.softmax(30 * (1.2 - before[neg]), 0)
        assert (w * (after[neg] - before[neg]))[big].sum() > -1e-12


# ---- loop reference on random batches -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kw", [dict(Tn=10), dict(Tn=0, Tp=0), dict(Tn=5, Tp=3, imbalance=0.3, alpha=1.1, margin=0.5)])
def test_value_and_gradients_match_loop_reference(seed, kw):
    x, y = paired_batch(seed=seed)
    x.requires_grad_(True)
    margin = kw.pop("margin", 0.4)
    ref = reference_loss(x, y.tolist(), margin=margin, **kw)
    (g_ref,) = torch.autograd.grad(ref, x)
    auto = RankedListLoss(margin=margin, gradient="autograd", **kw)(x, y)
    (g_auto,) = torch.autograd.grad(auto, x)
    assert auto.item() == pytest.approx(ref.item(), abs=1e-10)
    assert torch.allclose(g_auto, g_ref, atol=1e-10)
    paper = RankedListLoss(margin=margin, gradient="paper", **kw)(x, y)
    (g_paper,) = torch.autograd.grad(paper, x)
    assert paper.item() == pytest.approx(ref.item(), abs=1e-10)
    g_hand = reference_paper_gradient(x, y.tolist(), margin=margin, **kw)
    assert torch.allclose(g_paper, g_hand, atol=1e-10)


@pytest.mark.parametrize("gradient", ["paper", "autograd"])
def test_large_batch_fast_path_equals_reference_in_float32(gradient):
    # blocks of queries, near-duplicates (exact refinement) and both gradient modes at a size that uses several blocks
    x, y = paired_batch(n=64, dim=16, classes=8, seed=3)
    x[5] = x[4]  # identical embeddings
    x[9] = x[8] * 2  # identical after normalisation
    x64 = x.clone().requires_grad_(True)
    x32 = x.float().requires_grad_(True)
    loss = RankedListLoss(0.4, Tn=10, gradient=gradient)
    l64, l32 = loss(x64, y), loss(x32, y)
    (g64,) = torch.autograd.grad(l64, x64)
    (g32,) = torch.autograd.grad(l32, x32)
    if gradient == "paper":
        ref = reference_loss(x.detach(), y.tolist(), Tn=10)
        assert torch.allclose(g64, reference_paper_gradient(x, y.tolist(), Tn=10), atol=1e-10)
    else:
        xr = x.clone().requires_grad_(True)
        ref = reference_loss(xr, y.tolist(), Tn=10)
    assert l64.item() == pytest.approx(ref.item(), abs=1e-9)
    assert l32.item() == pytest.approx(ref.item(), abs=1e-5)
    assert torch.allclose(g32.double(), g64, atol=1e-4)


def test_blocked_forward_matches_single_block(monkeypatch):
    from pml_rll.functional import ranked_list_list as fast

    x, y = paired_batch(n=40, dim=6, seed=4)
    x.requires_grad_(True)
    whole = RankedListLoss(0.4, Tn=10, gradient="autograd")(x, y)
    (g_whole,) = torch.autograd.grad(whole, x)
    monkeypatch.setattr(fast, "_BLOCK_ELEMENTS", 3 * 40)  # three queries per block
    blocked = RankedListLoss(0.4, Tn=10, gradient="autograd")(x, y)
    (g_blocked,) = torch.autograd.grad(blocked, x)
    assert blocked.item() == pytest.approx(whole.item(), abs=1e-12)
    assert torch.allclose(g_blocked, g_whole, atol=1e-12)


def test_generic_distance_path_equals_fast_path():
    class MyLp(LpDistance):  # not exactly LpDistance: forces the generic path
        pass

    x, y = paired_batch(seed=5)
    for gradient in ("paper", "autograd"):
        xa = x.clone().requires_grad_(True)
        xb = x.clone().requires_grad_(True)
        fast = RankedListLoss(0.4, Tn=10, gradient=gradient)(xa, y)
        generic = RankedListLoss(0.4, Tn=10, gradient=gradient, distance=MyLp())(xb, y)
        (ga,) = torch.autograd.grad(fast, xa)
        (gb,) = torch.autograd.grad(generic, xb)
        assert generic.item() == pytest.approx(fast.item(), abs=1e-10)
        assert torch.allclose(ga, gb, atol=1e-10)


def test_unnormalised_distance_matches_reference():
    x, y = paired_batch(seed=6)
    x = x / 3
    loss = RankedListLoss(0.4, Tn=10, distance=LpDistance(normalize_embeddings=False))(x, y)
    d = torch.cdist(x, x)
    expected = 0.0
    for i in range(len(x)):
        P = [d[i, j] - 0.8 for j in range(len(x)) if j != i and y[j] == y[i] and d[i, j] > 0.8]
        N = [1.2 - d[i, j] for j in range(len(x)) if y[j] != y[i] and d[i, j] < 1.2]
        lp = sum(P) / len(P) if P else 0.0
        ln = sum(math.exp(10 * float(v)) * v for v in N) / sum(math.exp(10 * float(v)) for v in N) if N else 0.0
        expected += 0.5 * float(lp) + 0.5 * float(ln)
    assert loss.item() == pytest.approx(expected / len(x), abs=1e-10)


# ---- invariances, edge cases, numerics ----------------------------------------------------------------------


def test_permutation_invariance():
    x, y = paired_batch(seed=7)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    loss = RankedListLoss(0.4, Tn=10)
    assert loss(x[perm], y[perm]).item() == pytest.approx(loss(x, y).item(), abs=1e-12)


def test_edge_cases():
    loss = RankedListLoss(0.4, Tn=10)
    x = torch.randn(1, 4, dtype=F64)
    assert loss(x, torch.tensor([0])).item() == 0.0  # one element: nothing to rank
    x, _ = paired_batch(seed=8)
    distinct = torch.arange(len(x))
    assert loss(x, distinct).item() == pytest.approx(reference_loss(x, distinct.tolist(), Tn=10).item(), abs=1e-10)
    equal = torch.zeros(len(x), dtype=torch.long)
    assert loss(x, equal).item() == pytest.approx(reference_loss(x, equal.tolist(), Tn=10).item(), abs=1e-10)
    # m = 0: one boundary; m > alpha: every positive counts, d = 0 included
    for kw in (dict(margin=0.0), dict(margin=1.5, alpha=1.2)):
        got = RankedListLoss(Tn=10, **kw)(x, y := torch.arange(len(x)) % 3).item()
        assert got == pytest.approx(reference_loss(x, y.tolist(), Tn=10, **kw).item(), abs=1e-10)


def test_case9_boundary_ties_are_trivial():
    # docs/ranked_list_loss.md, case 9.
    # exact distances without normalisation: d(0,1) = d(1,2) = d(0,3) = 0.5 = alpha - m, d(0,2) = 1.0 = alpha.
    # Strict sets (the paper): ties are trivial. By hand, per query: 0.5, 0.146447, 0.25, 0.198223.
    # Counting ties (>= / <=) would give 0.21117 instead.
    x = torch.tensor([[0, 0], [0.5, 0], [1, 0], [0, 0.5]], dtype=F64)
    y = torch.tensor([0, 0, 0, 1])
    loss = RankedListLoss(margin=0.5, alpha=1.0, Tn=0, distance=LpDistance(normalize_embeddings=False))
    expected = (0.5 + 0.5 * (1 - 0.5**0.5) + 0.25 + 0.25 * (0.5 + (1 - 0.5**0.5))) / 4
    assert expected == pytest.approx(0.27367, abs=1e-5)
    assert loss(x, y).item() == pytest.approx(expected, abs=1e-12)


def test_near_duplicate_positives_count_when_every_positive_does():
    # alpha = m (the CVPR paper's Table 4, "every positive counts"): positives a few 1e-4 apart are non-trivial
    # even though the float32 Gram matrix cannot resolve their distance
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 512, generator=g)
    x[1] = x[0] + 1e-5 * torch.randn(512, generator=g)
    y = torch.tensor([0, 0, 0, 1])
    ref = reference_loss(x.double(), y.tolist(), margin=1.2, alpha=1.2, Tn=10)
    loss = RankedListLoss(margin=1.2, alpha=1.2, Tn=10)
    assert loss(x, y).item() == pytest.approx(ref.item(), abs=1e-5)
    from pml_rll.miners import RankedListMiner

    mined = RankedListMiner(margin=1.2, alpha=1.2)(x, y)
    assert loss(x, y, mined).item() == pytest.approx(ref.item(), abs=1e-5)


def test_autocast_computes_in_float32():
    x, y = paired_batch(seed=12, dtype=torch.float32)
    x.requires_grad_(True)
    for gradient in ("paper", "autograd"):
        loss = RankedListLoss(0.4, Tn=10, gradient=gradient)
        plain = loss(x, y)
        (g_plain,) = torch.autograd.grad(plain, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = loss(x, y)
        (g_mixed,) = torch.autograd.grad(mixed, x)
        assert mixed.dtype == torch.float32
        assert mixed.item() == pytest.approx(plain.item(), abs=1e-6)
        assert torch.allclose(g_mixed, g_plain, atol=1e-6)


def test_large_temperature_approaches_hardest_negative():
    x, y = paired_batch(seed=9, dtype=torch.float32)
    got = RankedListLoss(0.4, Tn=50, imbalance=1.0, reducer=None)(x, y).item()
    ref = reference_loss(x.double(), y.tolist(), Tn=50, imbalance=1.0).item()
    assert got == pytest.approx(ref, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Tn", [0.0, 10.0, 100.0, 1000.0])
@pytest.mark.parametrize("regime", ["random", "collapsed"])
def test_finite_for_any_temperature_and_dtype(dtype, Tn, regime):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    if regime == "collapsed":  # what a fresh network often outputs
        x = torch.randn(1, 32, generator=g) + 1e-3 * x
    y = torch.arange(64) % 16
    x = x.to(dtype).requires_grad_(True)
    for gradient in ("paper", "autograd"):
        loss = RankedListLoss(0.4, Tn=Tn, Tp=Tn / 10, gradient=gradient)(x, y)
        (grad,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert grad.dtype == dtype
        if regime == "collapsed":
            assert loss.item() > 0.1


# ---- errors -------------------------------------------------------------------------------------------------


def test_bad_arguments():
    with pytest.raises(ValueError, match="imbalance"):
        RankedListLoss(imbalance=1.5)
    with pytest.raises(ValueError, match="gradient"):
        RankedListLoss(gradient="exact")
    with pytest.raises(TypeError, match="margin"):
        RankedListLoss(margin="0.4")
    with pytest.raises(ValueError, match="Tn"):
        RankedListLoss(Tn=float("nan"))
    with pytest.raises(ValueError, match="distance"):
        RankedListLoss(distance=CosineSimilarity())
    with pytest.raises(ValueError, match="margin"):
        RankedListLoss(margin=-0.1)
    with pytest.raises(ValueError, match="alpha"):
        RankedListLoss(alpha=0.0)
    import numpy as np

    assert RankedListLoss(margin=np.float32(0.4), Tn=np.int64(10)).Tn == 10.0


def test_bad_inputs():
    loss = RankedListLoss()
    x = torch.randn(8, 4)
    with pytest.raises(ValueError, match="labels or an indices_tuple"):
        loss(x)
    with pytest.raises(ValueError):
        loss(x, torch.zeros(7, dtype=torch.long))
    with pytest.raises(ValueError, match="embeddings"):
        loss(torch.randn(8), torch.zeros(8, dtype=torch.long))
    with pytest.raises(TypeError, match="labels"):
        loss(x, [0] * 8)
    with pytest.raises(TypeError, match="indices_tuple"):
        loss(x, None, (torch.tensor([0.7]), torch.tensor([1.9]), torch.tensor([0]), torch.tensor([2])))
    assert loss(torch.randn(0, 4), torch.zeros(0, dtype=torch.long)).item() == 0.0
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        loss(bad, torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="ref_emb"):
        loss(x, torch.zeros(8, dtype=torch.long), ref_emb=torch.randn(5, 3), ref_labels=torch.zeros(5))
    with pytest.raises(ValueError, match="ref_labels"):
        loss(x, torch.zeros(8, dtype=torch.long), ref_emb=torch.randn(5, 4))
    loss.distance = CosineSimilarity()  # swapped after construction
    with pytest.raises(ValueError, match="similarity"):
        loss(x, torch.zeros(8, dtype=torch.long))


def test_record_keeper_attributes():
    loss = RankedListLoss(0.3, Tn=7, collect_stats=True)
    x, y = paired_batch(seed=10)
    loss(x, y)
    for name in ("margin", "alpha", "Tp", "Tn", "imbalance"):
        assert name in loss._record_these
    assert "avg_num_pos_per_query" in loss._record_these_stats
    e = torch.nn.functional.normalize(x, dim=1)
    d = torch.cdist(e, e)
    same = (y[:, None] == y[None]) & ~torch.eye(len(y), dtype=torch.bool)
    assert loss.avg_num_pos_per_query == pytest.approx(float((same & (d > 1.15 - 0.3)).sum()) / len(y))
    assert loss.avg_num_neg_per_query == pytest.approx(float(((y[:, None] != y[None]) & (d < 1.15)).sum()) / len(y))
