"""RankedListReducer: the ranked-list reduction of a PML pair loss (docs/ranked_list_loss.md, section 2.4)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_rll import losses, reducers
from tests.conftest import hand_case, paired_batch
from tests.reference.ranked_list_loss import reference_loss

batch = partial(paired_batch, n=24, dim=6, classes=4, noise=0.4)


@pytest.mark.parametrize("gradient", ["paper", "autograd"])
@pytest.mark.parametrize("kw", [dict(Tn=10), dict(Tn=4, Tp=2, imbalance=0.7)])
def test_contrastive_with_ranked_list_reducer_equals_loss(gradient, kw):
    x, y = batch()
    loss = losses.RankedListLoss(0.4, gradient=gradient, **kw)
    reducer = reducers.RankedListReducer(gradient=gradient, **kw)
    pair_loss = pml_losses.ContrastiveLoss(pos_margin=loss.alpha - loss.margin, neg_margin=loss.alpha, reducer=reducer)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    la = loss(xa, y)
    if gradient == "paper":  # query-only rule: the gallery is the detached batch
        lb = pair_loss(xb, y, ref_emb=xb.detach(), ref_labels=y)
    else:
        lb = pair_loss(xb, y)
    (ga,), (gb,) = torch.autograd.grad(la, xa), torch.autograd.grad(lb, xb)
    assert lb.item() == pytest.approx(la.item(), abs=1e-12)
    assert torch.allclose(ga, gb, atol=1e-12)


def test_reducer_on_another_pair_loss_and_empty_sets():
    x, y = batch(seed=1)
    reducer = reducers.RankedListReducer(Tn=10)
    # margin loss style: any pos_pair / neg_pair losses; all labels distinct: no positive pairs at all
    pair_loss = pml_losses.ContrastiveLoss(pos_margin=0.8, neg_margin=1.2, reducer=reducer)
    distinct = torch.arange(len(x))
    assert pair_loss(x, distinct).item() == pytest.approx(reference_loss(x, distinct.tolist(), Tn=10).item(), abs=1e-12)
    with pytest.raises(ValueError, match="imbalance"):
        reducers.RankedListReducer(imbalance=-0.1)
    # no pairs at all (e.g. an empty miner output): zero, like RankedListLoss
    e = torch.tensor([], dtype=torch.long)
    assert pair_loss(x, distinct, (e, e, e, e)).item() == 0.0
    # a pair listed several times counts once, as in RankedListLoss
    a1, p, a2, n = lmu.get_all_pairs_indices(y)
    dup = (torch.cat([a1, a1[:5]]), torch.cat([p, p[:5]]), torch.cat([a2, a2[:9]]), torch.cat([n, n[:9]]))
    pair_loss = pml_losses.ContrastiveLoss(pos_margin=0.8, neg_margin=1.2, reducer=reducers.RankedListReducer(Tn=10))
    expected = losses.RankedListLoss(0.4, Tn=10)(x, y)
    assert pair_loss(x, y, dup).item() == pytest.approx(expected.item(), abs=1e-12)
    assert losses.RankedListLoss(0.4, Tn=10)(x, y, dup).item() == pytest.approx(expected.item(), abs=1e-12)


CASE8_B = [(0, 0.014377), (-0.041919, 0.015257), (0.131141, -0.227143), (-0.050242, 0.042158), (-0.119260, -0.068855)]


def test_constant_weights_on_both_pair_ends_is_case8_column_b():
    # docs/ranked_list_loss.md, case 8, column (B): the reducer's constant weights, without the detached reference
    # that makes the rule query-only, move both ends of every pair
    x, y = hand_case([0, 70, 30, 50, 120], [0, 0, 1, 1, 1])
    x.requires_grad_(True)
    reducer = reducers.RankedListReducer(Tn=10, gradient="paper")
    pair_loss = pml_losses.ContrastiveLoss(pos_margin=0.8, neg_margin=1.2, reducer=reducer)
    (g,) = torch.autograd.grad(pair_loss(x, y), x)
    assert torch.allclose(g, torch.tensor(CASE8_B, dtype=torch.float64), atol=2e-6)
