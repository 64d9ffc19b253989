"""Remedies for the collapse of the structure embedding: centred s and the short-list ranking term (docs/namr.md,
section 9), against loop references, hand cases and a small training run."""

from __future__ import annotations

import math

import pytest
import torch

from pml_rll.functional import namr as F_namr
from pml_rll.losses import MultiClusterRankingLoss, NAMRLoss
from pml_rll.retrieval import NAMRReRankKNN
from tests.conftest import sample_and_structure
from tests.reference import namr as ref


def _labels(n, classes=3):
    return torch.arange(n) % classes


# ---------------------------------------------------------------------------------------------- centred s
def test_centre_structure_matches_loop_and_uses_the_reference_mean():
    _, s = sample_and_structure(5, 3, seed=0)
    torch.testing.assert_close(F_namr.centre_structure(s), ref.centred_structure(s), rtol=1e-14, atol=0)
    _, other = sample_and_structure(7, 3, seed=1)
    torch.testing.assert_close(F_namr.centre_structure(s, other), s / other.mean(0), rtol=1e-14, atol=0)
    assert (F_namr.centre_structure(s).mean(0) - 1).abs().max() < 1e-12


def test_centred_loss_ignores_a_global_reweighting_and_its_gradient_has_no_global_part():
    x, s = sample_and_structure(8, 4, seed=2)
    loss = MultiClusterRankingLoss(4, centre_structure=True)
    plain = MultiClusterRankingLoss(4)
    scale = torch.tensor([[0.6, 1.3, 2.0, 0.9]], dtype=torch.float64)
    v = loss(torch.cat([x, s], 1))
    torch.testing.assert_close(loss(torch.cat([x, s * scale], 1)), v, rtol=1e-12, atol=1e-14)
    assert (plain(torch.cat([x, s * scale], 1)) - plain(torch.cat([x, s], 1))).abs() > 1e-3
    s_req = s.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(torch.cat([x, s_req], 1)), s_req)
    # scale invariance along s_k -> c * s_k (all samples): sum_i s_ik g_ik = 0 for every dimension k
    assert (s * g).sum(0).abs().max() < 1e-12 * g.abs().sum()
    assert g.abs().sum() > 0
    # equal to the plain loss on the centred s, computed by hand
    torch.testing.assert_close(v, plain(torch.cat([x, ref.centred_structure(s)], 1)), rtol=1e-12, atol=1e-14)


def test_rerank_knn_centres_with_the_reference_mean():
    x, s = sample_and_structure(12, 3, seed=3)
    packed = torch.cat([x, s], 1)
    knn = NAMRReRankKNN(3, num_candidates=11, centre_structure=True, mode="exhaustive")
    dist, idx = knn(packed[:4], 5, packed, ref_includes_query=True)
    sc = s / s.mean(0)
    for q in range(4):
        scores = sorted((ref.weighted_sq_distance(x[q], sc[q], x[j]), j) for j in range(12) if j != q)[:5]
        assert idx[q].tolist() == [j for _, j in scores]
        torch.testing.assert_close(dist[q], torch.tensor([v for v, _ in scores], dtype=torch.float64))
    # the same ranking for a query s multiplied by any per-dimension constant (the global part is removed)
    scaled = torch.cat([x, s * torch.tensor([[3.0, 0.5, 1.7]], dtype=torch.float64)], 1)
    assert knn(scaled[:4], 5, scaled, ref_includes_query=True)[1].tolist() == idx.tolist()
    # one query, sample-only references: centred s is all ones, so the order is the plain Euclidean one
    one = NAMRReRankKNN(3, num_candidates=11, centre_structure=True)(packed[:1], 6, x)
    plain = NAMRReRankKNN(3, num_candidates=11, mode="plain")(packed[:1], 6, x)
    assert one[1].tolist() == plain[1].tolist()
    with pytest.raises(TypeError, match="centre_structure"):
        NAMRReRankKNN(3, centre_structure="yes")


# ---------------------------------------------------------------------------------------------- short list
@pytest.mark.parametrize("k, temperature, seed", [(8, 0.1, 0), (3, 0.5, 1), (50, 0.05, 2)])
def test_shortlist_losses_and_gradient_match_loop_reference(k, temperature, seed):
    x, s = sample_and_structure(10, 3, seed=seed)
    labels = _labels(10)
    s_req = s.clone().requires_grad_(True)
    x_req = x.clone().requires_grad_(True)
    losses, has_pairs = F_namr.shortlist_ranking_losses(x_req, s_req, labels, k, temperature)
    want = ref.shortlist_ranking_loss(x, s_req, labels, k, temperature)
    for i, w in enumerate(want):
        assert has_pairs[i].item() == torch.is_tensor(w)
        assert losses[i].detach().item() == pytest.approx(float(w), rel=1e-12, abs=1e-14)
    assert has_pairs.any()
    (g,) = torch.autograd.grad(losses.sum(), s_req, retain_graph=True)
    (g_ref,) = torch.autograd.grad(sum(w for w in want if torch.is_tensor(w)), s_req)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-13)
    # x is detached: the term trains s only
    assert torch.autograd.grad(losses.sum(), x_req, allow_unused=True)[0] is None


def test_shortlist_hand_case():
    # anchor 0 at the origin; its positive 1 at (1, 0), a negative 2 at (0, 0.9); short list of 2
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.9]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    m = (1.0 + 0.81) / 2
    for s0, dp, dn in (((1.0, 1.0), 1.0, 0.81), ((0.5, 1.5), 0.5, 1.5 * 0.81)):
        s = torch.tensor([s0, [1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
        losses, has = F_namr.shortlist_ranking_losses(x, s, labels, k=2, temperature=0.1)
        assert losses[0].item() == pytest.approx(math.log1p(math.exp((dp - dn) / (0.1 * m))), rel=1e-12)
        assert has[0].item()
    # the s that ranks the positive first has the smaller loss; anchor 2 has no positive: loss 0, no pairs
    assert losses[0] < math.log(2) and losses[2] == 0 and not has[2]


def test_shortlist_term_in_the_loss_is_gamma_times_its_mean_and_needs_labels():
    x, s = sample_and_structure(9, 4, seed=4)
    labels = _labels(9)
    packed = torch.cat([x, s], 1)
    base = MultiClusterRankingLoss(4)(packed)
    with_short = MultiClusterRankingLoss(4, shortlist_weight=2.5, shortlist_k=5, shortlist_temperature=0.2)
    short, _ = F_namr.shortlist_ranking_losses(x, s, labels, 5, 0.2)
    torch.testing.assert_close(with_short(packed, labels), base + 2.5 * short.mean(), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="labels"):
        with_short(packed)
    for kwargs, err in (
        (dict(shortlist_weight=-1.0), ValueError),
        (dict(shortlist_k=1), ValueError),
        (dict(shortlist_temperature=0.0), ValueError),
        (dict(centre_structure=1), TypeError),
    ):
        with pytest.raises(err, match=next(iter(kwargs))):
            MultiClusterRankingLoss(4, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_remedies_in_low_precision(dtype):
    x, s = sample_and_structure(16, 6, seed=5)
    labels = _labels(16, 4)
    loss = MultiClusterRankingLoss(6, centre_structure=True, shortlist_weight=1.0)
    want = loss(torch.cat([x, s], 1), labels)
    packed = torch.cat([x, s], 1).to(dtype).requires_grad_(True)
    got = loss(packed, labels)
    got.backward()
    assert torch.isfinite(got) and torch.isfinite(packed.grad).all()
    if dtype == torch.float32:
        assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_namr_loss_passes_labels_and_rejects_a_call_without_them_unchanged():
    from pytorch_metric_learning.losses import ContrastiveLoss

    x, s = sample_and_structure(8, 4, seed=6)
    labels = _labels(8, 2)
    structure = MultiClusterRankingLoss(4, shortlist_weight=1.0)
    loss = NAMRLoss(ContrastiveLoss(), 4, structure_loss=structure, structure_weight=0.5)
    packed = torch.cat([x, s], 1)
    value = loss(packed, labels)
    assert torch.isfinite(value)
    before = loss.metric_loss_value
    pairs = (torch.tensor([0]), torch.tensor([2]), torch.tensor([0]), torch.tensor([1]))
    with pytest.raises(ValueError, match="labels"):
        loss(packed * 2, None, pairs)
    assert loss.metric_loss_value == before


# ---------------------------------------------------------------------------------------------- learning
def test_shortlist_term_learns_a_per_sample_structure_that_improves_re_ranking():
    """Two groups of classes, each discriminated by a different dimension and confused by the other: no single
    re-weighting of the dimensions serves both, a per-sample s does. Training s with the short-list term alone
    (x fixed) must make query-weighted re-ranking of the top 8 beat plain retrieval."""
    g = torch.Generator().manual_seed(0)
    n_per, classes = 6, 8
    labels = torch.arange(classes).repeat_interleave(n_per)
    group = (labels >= classes // 2).long()
    centre = torch.zeros(classes, 2, dtype=torch.float64)
    centre[: classes // 2, 0] = torch.arange(classes // 2) * 1.0
    centre[classes // 2 :, 1] = torch.arange(classes // 2) * 1.0
    noise = torch.randn(len(labels), 2, generator=g, dtype=torch.float64)
    scale = torch.where(group[:, None] == 0, torch.tensor([[0.15, 1.2]]), torch.tensor([[1.2, 0.15]]))
    x = centre[labels] + 10.0 * (group[:, None] == 1) + noise * scale.double()
    features = torch.cat([x, torch.nn.functional.one_hot(group, 2).double()], 1)

    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()
    opt = torch.optim.Adam(head.parameters(), lr=0.02)

    def s_of():
        return 0.5 + torch.sigmoid(head(features))

    def rerank_p1(s):
        knn = NAMRReRankKNN(2, num_candidates=8)
        _, idx = knn(torch.cat([x, s], 1), 1, x, ref_includes_query=True)
        return (labels[idx[:, 0]] == labels).double().mean().item()

    plain_p1 = rerank_p1(torch.ones_like(x))
    first = None
    for _ in range(100):
        losses, has = F_namr.shortlist_ranking_losses(x, s_of(), labels, k=8, temperature=0.1)
        value = losses[has].mean()
        first = value.item() if first is None else first
        opt.zero_grad()
        value.backward()
        opt.step()
    s = s_of().detach()
    assert value.item() < 0.8 * first
    # per-sample: the two groups up-weight different dimensions
    assert s[group == 0, 0].mean() > s[group == 0, 1].mean() + 0.3
    assert s[group == 1, 1].mean() > s[group == 1, 0].mean() + 0.3
    assert rerank_p1(s) > plain_p1 + 0.1
