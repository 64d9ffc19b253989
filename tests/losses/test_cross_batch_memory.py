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


@pytest.mark.parametrize("inner", [losses.RankedListLoss, pml_losses.ContrastiveLoss])
def test_empty_batch_gives_a_zero_loss_and_leaves_the_memory(inner, unchanged):
    xbm = losses.CrossBatchMemory(inner(), 6, memory_size=48)
    first, y1 = batch(seed=7)
    second, y2 = batch(seed=8)
    for _ in range(2):  # on an empty memory, then on a partly filled one
        empty = torch.zeros(0, 6, dtype=torch.float16, requires_grad=True)
        with unchanged(xbm):
            loss = xbm(empty, torch.zeros(0, dtype=torch.long))
        assert loss.item() == 0.0 and loss.dtype == torch.float16
        loss.backward()
        assert empty.grad.shape == (0, 6)
        xbm(first.float(), y1)
    # the empty calls changed nothing: the next batch sees the memory of the two real calls only
    fresh = losses.CrossBatchMemory(inner(), 6, memory_size=48)
    fresh(first.float(), y1)
    fresh(first.float(), y1)
    assert xbm(second.float(), y2).item() == fresh(second.float(), y2).item()
    assert torch.equal(xbm.embedding_memory, fresh.embedding_memory) and xbm.queue_idx == fresh.queue_idx


def test_pml_cross_batch_memory_fails_on_an_empty_batch():
    # what the README's table says of PML's class (the reason for the zero loss above)
    xbm = pml_losses.CrossBatchMemory(pml_losses.ContrastiveLoss(), 6, memory_size=48)
    with pytest.raises(IndexError):
        xbm(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))


def test_enqueue_mask_without_rows_enqueues_nothing():
    loss = losses.RankedListLoss(0.4, Tn=10)
    xbm = losses.CrossBatchMemory(loss, 6, memory_size=48)
    first, y1 = batch(seed=7)
    second, y2 = batch(seed=8)
    xbm(first.float(), y1)
    memory, memory_labels = xbm.embedding_memory.clone(), xbm.label_memory.clone()
    got = xbm(second.float(), y2, enqueue_mask=torch.zeros(len(y2), dtype=torch.bool))
    assert torch.equal(xbm.embedding_memory, memory) and torch.equal(xbm.label_memory, memory_labels)
    assert xbm.queue_idx == 24 and len(xbm.curr_batch_idx) == 0  # this call enqueued no slot
    assert not xbm.has_been_filled  # 24 of 48 slots: PML's update marked the memory as full here
    # the queries against the 24 filled slots, none of them a query's own copy
    expected = reference_loss(second, None, Tn=10, ref=first, pos_pairs=_pairs(y2, y1, True), neg_pairs=_pairs(y2, y1))
    assert got.item() == pytest.approx(expected.item(), abs=1e-5)


def _pairs(labels, ref_labels, positive=False):
    return {
        (i, j)
        for i in range(len(labels))
        for j in range(len(ref_labels))
        if bool(labels[i] == ref_labels[j]) == positive
    }
