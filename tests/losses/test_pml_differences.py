"""Where this package's RankedListLoss and PML 2.9's differ, on the hand cases (docs/ranked_list_loss.md, section 5)."""

from __future__ import annotations

import math
import warnings
from functools import partial

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from pml_rll import losses
from tests.conftest import hand_case, paired_batch

batch = partial(paired_batch, n=24, dim=6, classes=4, noise=0.4)


def pml_ranked_list_loss(**kwargs):
    with warnings.catch_warnings():  # PML warns about temperatures above 5
        warnings.simplefilter("ignore")
        return pml_losses.RankedListLoss(**kwargs)


@pytest.mark.parametrize(
    "angles,labels,kw,pml,ours",
    [
        ([0, 60, 90, 180], [0, 0, 1, 1], dict(Tn=10), 0.3741357, 0.3741439),  # case 1: PML's N * 1e-5 epsilon
        ([0, 0, 90, 180], [0, 1, 0, 1], dict(Tn=10), 0.4535352, 0.7535534),  # case 5: PML drops d = 0
        ([0, 0, 180], [0, 0, 1], dict(Tn=10, alpha=0.3), 0.0, 0.1 / 3),  # case 5b: PML drops d = 0
    ],
)
def test_values_on_hand_cases(angles, labels, kw, pml, ours):
    x, y = hand_case(angles, labels)
    assert pml_ranked_list_loss(margin=0.4, **kw)(x, y).item() == pytest.approx(pml, abs=1e-7)
    assert losses.RankedListLoss(margin=0.4, **kw)(x, y).item() == pytest.approx(ours, abs=1e-7)


def test_case6b_overflows_in_pml_float32_only():
    x, y = hand_case([0, 70, 10], [0, 0, 1], torch.float32)
    assert math.isnan(pml_ranked_list_loss(margin=0.4, Tn=100)(x, y).item())
    assert losses.RankedListLoss(margin=0.4, Tn=100)(x, y).item() == pytest.approx(0.4909471, abs=1e-6)


def test_drop_in_for_pml_ranked_list_loss():
    # PML's constructor call runs unchanged; where PML is correct (no zero distances, moderate temperature) the
    # value and the "autograd" gradients agree up to PML's N * 1e-5 epsilon
    x, y = batch(n=32, seed=11)
    kwargs = dict(margin=0.4, Tn=5.0, imbalance=0.4, alpha=1.1, Tp=2.0)
    theirs = pml_ranked_list_loss(**kwargs)
    ours = losses.RankedListLoss(**kwargs, gradient="autograd")
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    la, lb = ours(xa, y), theirs(xb, y)
    (ga,), (gb,) = torch.autograd.grad(la, xa), torch.autograd.grad(lb, xb)
    assert la.item() == pytest.approx(lb.item(), rel=1e-3)
    assert torch.allclose(ga, gb, rtol=1e-2, atol=1e-5)
    assert la.item() > lb.item()  # PML's epsilon only ever shrinks the value
