"""NAMR ablation options in the functional core: per-anchor centres and the re-ranking distances (loop references)."""

from __future__ import annotations

import pytest
import torch

from pml_rll.functional import namr as F_namr
from tests.reference import namr as ref


def _xs(n=7, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), 0.5 + torch.rand(n, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("k", [None, 2, 4, 50])
def test_per_anchor_statistics_match_loop(k):
    x, _ = _xs(seed=1)
    mu, sigma = F_namr.per_anchor_statistics(x, k)
    for i in range(x.shape[0]):
        m_ref, s_ref = ref.row_stats(x, i, None if k is None or k >= x.shape[0] - 1 else k)
        assert mu[i].item() == pytest.approx(m_ref, rel=1e-10)
        assert sigma[i].item() == pytest.approx(s_ref, rel=1e-8)


def test_per_anchor_centres_flag_repeated_centres():
    mu = torch.tensor([1.0, 1.0], dtype=torch.float64)
    sigma = torch.tensor([0.1, 0.5], dtype=torch.float64)
    eta, dup = F_namr.per_anchor_centres(mu, sigma, (0.0, 2.0, 3.0), floor=0.2)
    # row 0: 1.0, 0.8, 0.7 (distinct); row 1: 1.0, max(0.2, 0) = 0.2, 0.2 (repeated)
    torch.testing.assert_close(eta, torch.tensor([[1.0, 0.8, 0.7], [1.0, 0.2, 0.2]], dtype=torch.float64))
    assert dup.tolist() == [[False, False, False], [False, False, True]]
    # a repeated centre gets weight 0, so the loss equals the one with that centre removed
    dist = torch.tensor([[0.0, 0.3], [0.3, 0.0]], dtype=torch.float64)
    weights = F_namr.soft_assignment(dist, eta, 10.0, dup)
    assert weights[1, :, 2].abs().max() == 0
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, dtype=torch.float64))


@pytest.mark.parametrize("k, t_values", [(None, (0.0, 3.0)), (3, (0.0, 1.0)), (None, (0.0, 0.5, 1.0))])
def test_per_anchor_loss_and_gradients_match_loop(k, t_values):
    x, s = _xs(n=6, seed=2)
    xr, sr = x.clone().requires_grad_(True), s.clone().requires_grad_(True)
    want = ref.per_anchor_multi_cluster_loss(xr, sr, t_values, 10.0, 0.2, k)
    gx_w, gs_w = torch.autograd.grad(want, (xr, sr))
    xg, sg = x.clone().requires_grad_(True), s.clone().requires_grad_(True)
    losses, _, centres = F_namr.multi_cluster_anchor_losses(
        xg, sg, t_values, 10.0, 0.2, center_mode="per_anchor", neighbourhood_k=k
    )
    got = losses.mean()
    gx, gs = torch.autograd.grad(got, (xg, sg))
    assert centres.shape == (6, len(t_values))
    torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx, gx_w, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gs, gs_w, rtol=1e-8, atol=1e-10)


def test_unknown_center_mode_raises():
    x, s = _xs()
    with pytest.raises(ValueError, match="center_mode"):
        F_namr.multi_cluster_anchor_losses(x, s, center_mode="global")


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("blend", [1.0, 0.5, 0.0])
def test_rerank_distances_match_loop(symmetric, blend):
    q, sq = _xs(n=4, seed=3)
    r, sr = _xs(n=5, seed=4)
    full = F_namr.rerank_sq_distance(q, sq, r, sr if symmetric else None, blend)
    cand = torch.tensor([[4, 0, 2], [1, 3, 0], [2, 2, 4], [0, 1, 3]])
    part = F_namr.structure_weighted_sq_distance_to_candidates(
        q, sq, r, cand, s_ref=sr if symmetric else None, blend=blend
    )
    for i in range(4):
        for j in range(5):
            want = ref.rerank_sq_distance(q[i], sq[i], r[j], sr[j] if symmetric else None, blend)
            assert full[i, j].item() == pytest.approx(want, rel=1e-9, abs=1e-12)
        for c in range(3):
            assert part[i, c].item() == pytest.approx(full[i, cand[i, c]].item(), rel=1e-9, abs=1e-12)
    if blend == 0.0:  # the plain squared Euclidean distance
        torch.testing.assert_close(full, F_namr.pairwise_sq_euclidean(q, r), rtol=1e-9, atol=1e-12)
