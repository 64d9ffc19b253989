"""MultiClusterRankingLoss and its functional core against a loop reference (docs/namr.md, section 4)."""

from __future__ import annotations

import pytest
import torch

from pml_rll.functional import namr as F_namr
from pml_rll.losses import MultiClusterRankingLoss
from tests.conftest import sample_and_structure
from tests.reference import namr as ref


def _packed(n=6, d=4, seed=0, offset=0.0, dtype=torch.float64):
    return sample_and_structure(n, d, seed, dtype, offset=offset)


def _loss_and_grads(loss_fn, x, s, **kwargs):
    x = x.clone().requires_grad_(True)
    s = s.clone().requires_grad_(True)
    value = loss_fn(x, s, **kwargs)
    gx, gs = torch.autograd.grad(value, (x, s))
    return value.detach(), gx, gs


def _module_loss(x, s, t_values=(0.0, 3.0), alpha=10.0, floor=0.2):
    return MultiClusterRankingLoss(x.shape[1], t_values=t_values, alpha=alpha, floor=floor)(torch.cat([x, s], 1))


@pytest.mark.parametrize(
    "t_values, alpha, floor, offset, seed",
    [
        ((0.0, 3.0), 10.0, 0.2, 0.0, 0),  # NASA configuration
        ((0.0, 3.0), 10.0, 0.2, 7.0, 1),  # large common offset (centring)
        ((0.0, 0.4, 0.8), 4.0, 0.1, 0.0, 2),  # M = 3, three distinct unfloored centres
        ((0.0, 0.5, 1.0, 1.5), 2.0, 0.3, 0.0, 3),  # M = 4
    ],
)
def test_value_and_gradients_match_loop_reference(t_values, alpha, floor, offset, seed):
    x, s = _packed(seed=seed, offset=offset)
    kw = dict(t_values=t_values, alpha=alpha, floor=floor)
    etas = ref.centres(x, t_values, floor)
    assert len(set(etas)) == len(etas), "test data must give distinct centres"
    v_ref, gx_ref, gs_ref = _loss_and_grads(ref.multi_cluster_loss, x, s, **kw)
    v, gx, gs = _loss_and_grads(_module_loss, x, s, **kw)
    assert v.dtype == torch.float64
    torch.testing.assert_close(v, v_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gs, gs_ref, rtol=1e-9, atol=1e-11)
    assert gs.abs().sum() > 0 and gx.abs().sum() > 0


def test_nasa_default_has_one_floored_centre():
    # The default (0, 3) on random data: eta_1 = max(0.2 mu, mu - 3 sigma); make sure the reference
    # comparison above exercises the floor branch somewhere.
    x, _ = _packed(seed=0)
    mu, sigma = ref.plain_distance_stats(x)
    assert mu - 3 * sigma < 0.2 * mu
    etas = F_namr.cluster_centres(*F_namr.distance_statistics(x), (0.0, 3.0), 0.2)
    torch.testing.assert_close(etas, torch.tensor([mu, 0.2 * mu], dtype=torch.float64), rtol=1e-12, atol=0)


def test_clamp_regime_near_duplicate_points():
    # Coordinates equal or almost equal trigger the per-dimension 1e-12 clamp of the NASA formula; the
    # implementation clamps the sum instead: the squared distance differs by at most d * s_max * 1e-12.
    x, s = _packed(n=5, d=4, seed=4)
    x[1, :2] = x[0, :2]  # two equal coordinates
    x[2] = x[0]  # an exact duplicate
    x[3, 3] = x[0, 3] + 1e-8  # squared difference 1e-16 < 1e-12
    v_ref, gx_ref, gs_ref = _loss_and_grads(ref.multi_cluster_loss, x, s)
    v, gx, gs = _loss_and_grads(_module_loss, x, s)
    torch.testing.assert_close(v, v_ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gs, gs_ref, rtol=1e-6, atol=1e-6)
    # distances: bounded by the documented tolerance inside the square root
    d_impl = F_namr.anchor_adaptive_sq_distance(x, s)
    for i in range(5):
        for j in range(5):
            d_ref = float(ref.adaptive_distance(x, s, i, j)) ** 2
            assert abs(float(d_impl[i, j]) - d_ref) <= 4 * 1.5 * 1e-12 + 1e-13
    assert torch.isfinite(gx).all() and torch.isfinite(gs).all()


def test_float32_close_to_float64_reference():
    x, s = _packed(n=8, d=5, seed=5)
    v_ref = ref.multi_cluster_loss(x, s)
    v32 = _module_loss(x.float(), s.float())
    assert v32.dtype == torch.float32
    torch.testing.assert_close(v32.double(), v_ref.detach(), rtol=1e-5, atol=1e-6)


def test_labels_are_ignored_and_batch_permutation_invariant():
    x, s = _packed(n=10, d=6, seed=6)
    packed = torch.cat([x, s], 1)
    loss = MultiClusterRankingLoss(6)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    base = loss(packed)
    assert torch.equal(loss(packed, labels), base)
    assert torch.equal(loss(packed, labels[torch.randperm(10, generator=torch.Generator().manual_seed(0))]), base)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loss(packed[perm], labels[perm]), base, rtol=1e-12, atol=1e-14)


def test_asymmetry_uses_the_anchor_structure_embedding():
    x, s = _packed(n=7, d=4, seed=7)
    i, j = 2, 5
    s2 = s.clone()
    s2[j] = 0.5 + torch.rand(4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    d1 = F_namr.anchor_adaptive_distance(x, s)
    d2 = F_namr.anchor_adaptive_distance(x, s2)
    assert torch.equal(d1[i], d2[i])  # row i depends on s_i only
    assert not torch.allclose(d1[j], d2[j])  # row j changed
    assert not torch.allclose(d1, d1.t())  # asymmetric
    # same for the per-anchor losses (centres depend on x only)
    loss = MultiClusterRankingLoss(4)
    # compute_loss needs ref_emb to be the batch itself
    p1, p2 = torch.cat([x, s], 1), torch.cat([x, s2], 1)
    l1 = loss.compute_loss(p1, None, None, p1, None)["loss"]["losses"]
    l2 = loss.compute_loss(p2, None, None, p2, None)["loss"]["losses"]
    mask = torch.ones(7, dtype=torch.bool)
    mask[j] = False
    assert torch.equal(l1[mask], l2[mask])
    assert l1[j] != l2[j]
    # reference check of one asymmetric entry
    torch.testing.assert_close(d1[i, j], ref.adaptive_distance(x, s, i, j).detach(), rtol=1e-12, atol=0)


def test_soft_assignments_sum_to_one_for_three_clusters():
    g = torch.Generator().manual_seed(10)
    dist = torch.rand(9, 9, generator=g, dtype=torch.float64) * 3
    centres = torch.tensor([2.0, 1.2, 0.4], dtype=torch.float64)
    c = F_namr.soft_assignment(dist, centres, alpha=10.0)
    assert c.shape == (9, 9, 3)
    torch.testing.assert_close(c.sum(-1), torch.ones(9, 9, dtype=torch.float64), rtol=0, atol=1e-14)
    assert (c > 0).all()
    # each distance is assigned mostly to its nearest centre
    nearest = (dist.unsqueeze(-1) - centres).abs().argmin(-1)
    assert (c.argmax(-1) == nearest).all()


def test_loss_vanishes_when_every_distance_sits_on_a_centre():
    centres = torch.tensor([2.0, 1.2, 0.4], dtype=torch.float64)
    dist = centres[torch.randint(0, 3, (6, 6), generator=torch.Generator().manual_seed(11))]
    small = F_namr.multi_cluster_pair_loss(dist, centres, alpha=100.0)
    assert small.max() < 1e-30
    off = dist + 0.1
    assert F_namr.multi_cluster_pair_loss(off, centres, alpha=100.0).min() > 0.09


@pytest.mark.parametrize(
    "d0, expected_direction",
    [(1.3, -1), (0.9, +1), (0.5, -1), (0.15, +1)],  # centres (1.0, 0.25): above mu down, ..., below eta_1 up
)
def test_gradient_moves_a_distance_to_its_nearest_centre(d0, expected_direction):
    centres = torch.tensor([1.0, 0.25], dtype=torch.float64)
    # a single 1-D pair with x difference 1 and weight s: D = sqrt(s); one SGD step on s
    s = torch.tensor([d0**2], dtype=torch.float64, requires_grad=True)
    dist = s.sqrt()
    loss = F_namr.multi_cluster_pair_loss(dist, centres, alpha=10.0).sum()
    loss.backward()
    s_new = s.detach() - 0.01 * s.grad
    moved = s_new.sqrt().item() - d0
    assert moved * expected_direction > 0
    nearest = centres[(d0 - centres).abs().argmin()].item()
    assert abs(s_new.sqrt().item() - nearest) < abs(d0 - nearest)


def test_duplicate_centres_after_the_floor_are_deduplicated():
    x, s = _packed(n=6, d=4, seed=0)
    mu, sigma = ref.plain_distance_stats(x)
    assert mu - 3 * sigma < 0.2 * mu and mu - 5 * sigma < 0.2 * mu  # both floored -> identical centres
    etas = F_namr.cluster_centres(*F_namr.distance_statistics(x), (0.0, 3.0, 5.0), 0.2)
    assert etas.numel() == 2
    packed = torch.cat([x, s], 1)
    two = MultiClusterRankingLoss(4, t_values=(0.0, 3.0))(packed)
    three = MultiClusterRankingLoss(4, t_values=(0.0, 3.0, 5.0), collect_stats=True)
    assert torch.equal(three(packed), two)
    assert three.num_centres == 2
    # the undeduplicated formula would differ: the floored tier would count twice
    doubled = ref.multi_cluster_loss(x, s, t_values=(0.0, 3.0, 5.0))
    assert abs(float(doubled) - float(two)) > 1e-4


def test_statistics_and_zero_sigma_batch():
    # all points identical: sigma = 0, every centre = max(floor*0, 0) = 0 -> one centre, finite loss
    x = torch.ones(4, 3, dtype=torch.float64)
    s = torch.ones(4, 3, dtype=torch.float64)
    loss = MultiClusterRankingLoss(3, t_values=(0.0, 1.0, 2.0), collect_stats=True)
    value = loss(torch.cat([x, s], 1))
    assert torch.isfinite(value) and loss.num_centres == 1
    assert value.item() == pytest.approx((3e-12) ** 0.5, rel=1e-6)


def test_memory_is_quadratic_not_cubic():
    # every tensor saved for backward must be O(N*N*M) or O(N*d), never O(N*N*d)
    n, d = 48, 96
    x, s = _packed(n=n, d=d, seed=12, dtype=torch.float32)
    x.requires_grad_(True)
    s.requires_grad_(True)
    sizes = []

    def pack_hook(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        value = MultiClusterRankingLoss(d, t_values=(0.0, 1.5, 3.0))(torch.cat([x, s], 1))
    value.backward()
    assert sizes and max(sizes) <= max(n * n * 3, 2 * n * d)


def test_invalid_inputs_raise_clear_errors():
    x, s = _packed(n=5, d=4, seed=13)
    packed = torch.cat([x, s], 1)
    loss = MultiClusterRankingLoss(4)
    with pytest.raises(ValueError, match="width 2 \\* embedding_size"):
        loss(packed[:, :7])
    with pytest.raises(ValueError, match="indices_tuple"):
        loss(packed, torch.arange(5), (torch.tensor([0]), torch.tensor([1]), torch.tensor([2])))
    with pytest.raises(ValueError, match="ref_emb"):
        loss(packed, None, None, packed.clone())
    bad = packed.clone()
    bad[0, 5] = -0.1
    with pytest.raises(ValueError, match="strictly positive"):
        loss(bad)
    bad = packed.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        loss(bad)
    with pytest.raises(ValueError, match="at least 2"):
        loss(packed[:1])
    with pytest.raises(TypeError, match="floating-point"):
        loss(packed.long())
    with pytest.raises(ValueError, match="distinct"):
        MultiClusterRankingLoss(4, t_values=(0.0, 3.0, 3.0))
    with pytest.raises(ValueError, match="alpha"):
        MultiClusterRankingLoss(4, alpha=0.0)
    with pytest.raises(ValueError, match="floor"):
        MultiClusterRankingLoss(4, floor=-0.1)
    with pytest.raises(ValueError, match="embedding_size"):
        MultiClusterRankingLoss(0)


def test_hyperparameters_are_recordable():
    loss = MultiClusterRankingLoss(4, t_values=(0.0, 1.5, 3.0), alpha=5.0, floor=0.1)
    for name in ["embedding_size", "alpha", "floor", "num_t_values"]:
        assert name in loss._record_these
    assert loss.num_t_values == 3 and loss.t_values == (0.0, 1.5, 3.0)


def test_half_precision_and_autocast_are_computed_in_float32():
    x, s = sample_and_structure(24, 8, seed=5, dtype=torch.float32)
    packed = torch.cat([x, s], 1)
    loss = MultiClusterRankingLoss(8)
    full = loss(packed)
    half = loss(packed.bfloat16())
    assert half.dtype == torch.float32 and abs(half.item() - full.item()) < 2e-2 * abs(full.item())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = loss(packed)
    assert auto.dtype == torch.float32 and auto.item() == pytest.approx(full.item(), rel=1e-6)
