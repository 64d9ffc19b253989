"""Reducer, miner, ref_emb, pairs without labels, CrossBatchMemory and distributed paths of the Ranked List Loss."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.utils import distributed as pml_dist
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_rll import losses, miners, reducers
from tests.reference.ranked_list_loss import reference_loss

F64 = torch.float64


def batch(n=24, dim=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=F64)
    x[1::2] = x[0::2] + 0.4 * torch.randn(n // 2, dim, generator=g, dtype=F64)
    return x, torch.randint(0, classes, (n,), generator=g)


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
    else:  # the gallery is held fixed
        assert gr is None or torch.count_nonzero(gr) == 0
        assert torch.isfinite(gq).all() and gq.abs().sum() > 0


def test_cross_batch_memory():
    emb_size = 6
    xbm = losses.CrossBatchMemory(losses.RankedListLoss(0.4, Tn=10), emb_size, memory_size=48)
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
    assert torch.isfinite(q.grad).all()
    with pytest.raises(ValueError, match="PML's RankedListLoss"):
        losses.CrossBatchMemory(pml_losses.RankedListLoss(margin=0.4, Tn=1), emb_size)
    losses.CrossBatchMemory(pml_losses.ContrastiveLoss(), emb_size)  # PML's own list still works


# ---- distributed: 2 processes, gloo, CPU --------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, x, y, init, efficient, gradient, out):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Linear(x.shape[1], 8).double()
    model.load_state_dict(init)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    loss_fn = pml_dist.DistributedLossWrapper(losses.RankedListLoss(0.4, Tn=10, gradient=gradient), efficient=efficient)
    half = len(x) // world
    local = slice(rank * half, (rank + 1) * half)
    loss = loss_fn(ddp(x[local]), y[local])
    loss.backward()
    if rank == 0:
        out.put((loss.item(), model.weight.grad.tolist(), model.bias.grad.tolist()))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown, where gloo's threads sometimes abort the process after the test is done


@pytest.mark.parametrize("gradient", ["paper", "autograd"])
def test_distributed_loss_wrapper_two_processes(gradient):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 10, generator=g, dtype=F64)
    y = torch.arange(32) % 8
    model = torch.nn.Linear(10, 8).double()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    full = losses.RankedListLoss(0.4, Tn=10, gradient=gradient)(model(x), y)
    full.backward()
    ctx = mp.get_context("spawn")
    for efficient in (False, True):
        q = ctx.SimpleQueue()
        mp.spawn(_worker, args=(2, _free_port(), x, y, init, efficient, gradient, q), nprocs=2, join=True)
        loss, gw, gb = q.get()
        gw, gb = torch.tensor(gw, dtype=F64), torch.tensor(gb, dtype=F64)
        assert torch.isfinite(gw).all() and torch.isfinite(gb).all() and gw.abs().sum() > 0
        if not efficient:  # gradients equal the single-process full batch
            assert torch.allclose(gw, model.weight.grad, atol=1e-12)
            assert torch.allclose(gb, model.bias.grad, atol=1e-12)


def test_drop_in_for_pml_ranked_list_loss():
    # PML's constructor call runs unchanged; where PML is correct (no zero distances, moderate temperature) the
    # value and the "autograd" gradients agree up to PML's N * 1e-5 epsilon
    import warnings

    x, y = batch(n=32, seed=11)
    kwargs = dict(margin=0.4, Tn=5.0, imbalance=0.4, alpha=1.1, Tp=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = pml_losses.RankedListLoss(**kwargs)
    ours = losses.RankedListLoss(**kwargs, gradient="autograd")
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    la, lb = ours(xa, y), theirs(xb, y)
    (ga,), (gb,) = torch.autograd.grad(la, xa), torch.autograd.grad(lb, xb)
    assert la.item() == pytest.approx(lb.item(), rel=1e-3)
    assert torch.allclose(ga, gb, rtol=1e-2, atol=1e-5)
    assert la.item() > lb.item()  # PML's epsilon only ever shrinks the value
