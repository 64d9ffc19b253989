"""CrossBatchMemory with this package's RankedListLoss: the memory is the gallery, self pairs removed."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from pml_rll import losses
from tests.conftest import paired_batch
from tests.reference.ranked_list_loss import reference_loss, reference_paper_gradient

batch = partial(paired_batch, n=24, dim=6, classes=4, noise=0.4)


@pytest.mark.parametrize("gradient", ["paper", "autograd"])
def test_cross_batch_memory(gradient):
    emb_size = 6
    xbm = losses.CrossBatchMemory(losses.RankedListLoss(0.4, Tn=10, gradient=gradient), emb_size, memory_size=48)
    first, y1 = batch(seed=7)
    second, y2 = batch(seed=8)
    xbm(first.float(), y1)
    q = second.float().requires_grad_(True)
    got = xbm(q, y2)
    # second call: queries = second batch, gallery = memory (first then second batch), self pairs removed
    mem = torch.cat([first, second]).float()
    mem_y = torch.cat([y1, y2])
    n = len(second)
    pos = {(i, j) for i in range(n) for j in range(2 * n) if mem_y[j] == y2[i] and j != n + i}
    neg = {(i, j) for i in range(n) for j in range(2 * n) if mem_y[j] != y2[i]}
    expected = reference_loss(second, None, Tn=10, ref=mem.double(), pos_pairs=pos, neg_pairs=neg)
    assert got.item() == pytest.approx(expected.item(), abs=1e-5)
    got.backward()
    # the memory is a fixed gallery: the paper's rule by hand, the autograd rule through the loop reference
    if gradient == "paper":
        expected_grad = reference_paper_gradient(second, y2, Tn=10, ref=mem.double(), ref_labels=mem_y)
    else:
        xr = second.double().requires_grad_(True)
        value = reference_loss(xr, None, Tn=10, ref=mem.double(), pos_pairs=pos, neg_pairs=neg)
        (expected_grad,) = torch.autograd.grad(value, xr)
    assert torch.count_nonzero(expected_grad) > 0
    assert torch.allclose(q.grad.double(), expected_grad, atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="PML's RankedListLoss"):
        losses.CrossBatchMemory(pml_losses.RankedListLoss(margin=0.4, Tn=1), emb_size)
    losses.CrossBatchMemory(pml_losses.ContrastiveLoss(), emb_size)  # PML's own list still works
