"""RankedListLoss with pairs instead of labels and with a reference set (docs/ranked_list_loss.md, section 3.7)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from pml_rll import losses
from tests.conftest import paired_batch
from tests.reference.ranked_list_loss import reference_loss, reference_paper_gradient

batch = partial(paired_batch, n=24, dim=6, classes=4, noise=0.4)


def test_pairs_without_labels_multilabel():
    # multi-label data: two samples are positive when they share any tag
    x, _ = batch(seed=4)
    tags = torch.randint(0, 2, (len(x), 3), generator=torch.Generator().manual_seed(0)).bool()
    share = (tags.float() @ tags.float().T) > 0
    share.fill_diagonal_(False)
    disjoint = ~share
    disjoint.fill_diagonal_(False)
    a1, p = torch.where(share)
    a2, n = torch.where(disjoint)
    got = losses.RankedListLoss(0.4, Tn=10)(x, None, (a1, p, a2, n))
    expected = reference_loss(
        x, None, Tn=10, pos_pairs=set(zip(a1.tolist(), p.tolist())), neg_pairs=set(zip(a2.tolist(), n.tolist()))
    )
    assert got.item() == pytest.approx(expected.item(), abs=1e-12)
    with pytest.raises(ValueError, match="both as positive and as negative"):
        losses.RankedListLoss()(x, None, (a1, p, a1, p))
    with pytest.raises(ValueError, match="out of range"):
        losses.RankedListLoss()(x, None, (a1, p + 100, a2, n))


@pytest.mark.parametrize("gradient", ["paper", "autograd"])
def test_ref_emb_is_the_gallery(gradient):
    x, y = batch(seed=5)
    ref, ref_y = batch(n=30, seed=6)
    q = x.clone().requires_grad_(True)
    r = ref.clone().requires_grad_(True)
    loss = losses.RankedListLoss(0.4, Tn=10, gradient=gradient)(q, y, ref_emb=r, ref_labels=ref_y)
    qr, rr = x.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    expected = reference_loss(qr, y.tolist(), Tn=10, ref=rr, ref_labels=ref_y.tolist())
    assert loss.item() == pytest.approx(expected.item(), abs=1e-12)
    gq, gr = torch.autograd.grad(loss, (q, r), allow_unused=True)
    eq, er = torch.autograd.grad(expected, (qr, rr))
    if gradient == "autograd":
        assert torch.allclose(gq, eq, atol=1e-12) and torch.allclose(gr, er, atol=1e-12)
    else:  # the gallery is held fixed; the query's gradient is the paper's, written out by hand
        assert gr is None or torch.count_nonzero(gr) == 0
        by_hand = reference_paper_gradient(x, y.tolist(), Tn=10, ref=ref, ref_labels=ref_y.tolist())
        assert torch.allclose(gq, by_hand, atol=1e-12) and gq.abs().sum() > 0
