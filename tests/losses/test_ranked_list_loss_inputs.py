"""RankedListLoss with pairs instead of labels and with a reference set (docs/ranked_list_loss.md, section 3.7)."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import ContrastiveLoss

from pml_rll import losses
from pml_rll.functional.ranked_list_euclidean import PATHS
from pml_rll.miners import RankedListMiner
from pml_rll.reducers import RankedListReducer
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


# ---- the meta device: shapes and dtypes without values -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gradient", ["paper", "autograd"])
def test_meta_device_gives_the_shapes_and_dtypes_of_a_real_call(dtype, gradient):
    x, y = batch(seed=7, dtype=dtype)
    ref, ref_y = batch(n=10, seed=8, dtype=dtype)
    pairs = (torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5]))
    # every path with labels; pairs and a reference set on the default path
    calls = [(path, (y,)) for path in PATHS] + [("auto", (None, pairs)), ("auto", (y, None, ref, ref_y))]
    for path, args in calls:
        loss = losses.RankedListLoss(0.4, Tn=10, gradient=gradient, path=path, collect_stats=True)
        real, real_grad = _value_and_grad(loss, x, *args)
        assert loss.avg_num_pos_per_query == loss.avg_num_pos_per_query  # counted: not NaN
        meta, meta_grad = _value_and_grad(loss, x.to("meta"), *(_to_meta(a) for a in args))
        assert meta.is_meta and meta_grad.is_meta
        assert (meta.shape, meta.dtype) == (real.shape, real.dtype) == ((), dtype)
        assert (meta_grad.shape, meta_grad.dtype) == (real_grad.shape, real_grad.dtype) == (x.shape, dtype)
        # no values to count: the statistics are unknown, not a stale or made-up number
        assert math.isnan(loss.avg_num_pos_per_query) and math.isnan(loss.avg_num_neg_per_query)


def _to_meta(arg):
    if isinstance(arg, tuple):
        return tuple(_to_meta(a) for a in arg)
    return arg.to("meta") if torch.is_tensor(arg) else arg


def _value_and_grad(loss, x, *args):
    x = x.detach().clone().requires_grad_(True)
    value = loss(x, *args)
    (grad,) = torch.autograd.grad(value, x)
    return value, grad


def test_meta_device_is_refused_where_the_values_decide_the_sizes(rejects):
    x, y = batch(seed=9, dtype=torch.float32)
    xm, ym = x.to("meta"), y.to("meta")
    generic = losses.RankedListLoss(distance=LpDistance(power=2), collect_stats=True)
    generic(x, y)
    rejects(lambda: generic(xm, ym), ValueError, "embeddings", generic)
    miner = RankedListMiner(collect_stats=True)
    miner(x, y)
    rejects(lambda: miner(xm, ym), ValueError, "embeddings", miner)
    reducer = RankedListReducer(collect_stats=True)
    pair_loss = ContrastiveLoss(reducer=reducer)
    pair_loss(x, y)
    loss_dict = pair_loss.compute_loss(x, y, None, x, y)
    meta_dict = {k: {**v, "losses": v["losses"].to("meta")} for k, v in loss_dict.items()}
    rejects(lambda: reducer(meta_dict, xm, ym), ValueError, "embeddings", reducer)
    memory = losses.CrossBatchMemory(losses.RankedListLoss(), x.shape[1], memory_size=64)
    memory(x, y)
    rejects(lambda: memory(xm, ym), ValueError, "embeddings", memory)
