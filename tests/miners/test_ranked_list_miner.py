"""RankedListMiner and the Ranked List Loss restricted to mined pairs (docs/ranked_list_loss.md, sections 2.4, 3.7)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_rll import losses, miners
from tests.conftest import paired_batch
from tests.reference.ranked_list_loss import reference_loss

batch = partial(paired_batch, n=24, dim=6, classes=4, noise=0.4)


def test_miner_pairs_give_the_same_loss_and_are_the_non_trivial_sets():
    x, y = batch(seed=2)
    miner = miners.RankedListMiner(margin=0.4, collect_stats=True)
    a1, p, a2, n = miner(x, y)
    e = torch.nn.functional.normalize(x, dim=1)
    d = torch.cdist(e, e)
    eye = torch.eye(len(x), dtype=torch.bool)
    expected_pos = (y[:, None] == y[None]) & ~eye & (d > 0.8)
    expected_neg = (y[:, None] != y[None]) & (d < 1.2)
    got_pos = torch.zeros_like(eye)
    got_pos[a1, p] = True
    got_neg = torch.zeros_like(eye)
    got_neg[a2, n] = True
    assert torch.equal(got_pos, expected_pos) and torch.equal(got_neg, expected_neg)
    assert miner.avg_num_neg_per_query == pytest.approx(float(expected_neg.sum()) / len(x))
    for gradient in ("paper", "autograd"):
        loss = losses.RankedListLoss(0.4, Tn=10, gradient=gradient)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        la, lb = loss(xa, y), loss(xb, y, (a1, p, a2, n))
        (ga,), (gb,) = torch.autograd.grad(la, xa), torch.autograd.grad(lb, xb)
        assert lb.item() == pytest.approx(la.item(), abs=1e-12)
        assert torch.allclose(ga, gb, atol=1e-12)


def test_pml_miner_restricts_the_lists():
    x, y = batch(seed=3)
    triplets = pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="all")(x, y)
    pairs = lmu.convert_to_pairs(triplets, y)
    pos = set(zip(pairs[0].tolist(), pairs[1].tolist()))
    neg = set(zip(pairs[2].tolist(), pairs[3].tolist()))
    got = losses.RankedListLoss(0.4, Tn=10)(x, y, triplets)
    expected = reference_loss(x, y.tolist(), Tn=10, pos_pairs=pos, neg_pairs=neg)
    assert got.item() == pytest.approx(expected.item(), abs=1e-12)
