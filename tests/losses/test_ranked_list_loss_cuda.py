"""The same numbers on CUDA as on the CPU (skipped where there is no GPU)."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning.losses import ContrastiveLoss

from pml_rll import losses, miners, reducers
from tests.conftest import paired_batch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def batch(n=256, dim=64, seed=0):
    x, _ = paired_batch(n, dim, seed=seed, noise=0.5, dtype=torch.float32)
    x[7] = x[6]  # identical embeddings
    return x, torch.arange(n) % 32


@cuda
@pytest.mark.parametrize("gradient", ["paper", "autograd"])
@pytest.mark.parametrize("n", [256, 2048])
def test_cuda_matches_cpu(gradient, n):
    x, y = batch(n)
    loss = losses.RankedListLoss(0.4, Tn=10, gradient=gradient)
    xc, xg = x.double().requires_grad_(True), x.double().cuda().requires_grad_(True)
    lc, lg = loss(xc, y), loss(xg, y.cuda())
    (gc,), (gg,) = torch.autograd.grad(lc, xc), torch.autograd.grad(lg, xg)
    assert lg.item() == pytest.approx(lc.item(), abs=1e-10)
    assert torch.allclose(gg.cpu(), gc, atol=1e-10)
    x32 = x.cuda().requires_grad_(True)
    l32 = loss(x32, y.cuda())
    (g32,) = torch.autograd.grad(l32, x32)
    assert l32.item() == pytest.approx(lc.item(), abs=1e-4)
    assert torch.allclose(g32.double().cpu(), gc, atol=1e-4)


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Tn", [10.0, 1000.0])
def test_cuda_half_precision_is_finite(dtype, Tn):
    x, y = batch()
    x = (x[:1] + 1e-3 * x).cuda().to(dtype).requires_grad_(True)  # collapsed
    for gradient in ("paper", "autograd"):
        loss = losses.RankedListLoss(0.4, Tn=Tn, gradient=gradient)(x, y.cuda())
        (g,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(loss) and torch.isfinite(g).all() and g.dtype == dtype


@cuda
def test_cuda_reducer_miner_and_memory():
    x, y = batch()
    x, y = x.cuda(), y.cuda()
    loss = losses.RankedListLoss(0.4, Tn=10)
    pairs = miners.RankedListMiner(0.4)(x, y)
    assert loss(x, y, pairs).item() == pytest.approx(loss(x, y).item(), abs=1e-5)
    pair_loss = ContrastiveLoss(pos_margin=0.8, neg_margin=1.2, reducer=reducers.RankedListReducer(Tn=10))
    assert pair_loss(x, y, ref_emb=x, ref_labels=y).item() == pytest.approx(loss(x, y).item(), abs=1e-5)
    xbm = losses.CrossBatchMemory(loss, 64, memory_size=1024).cuda()
    assert torch.isfinite(xbm(x, y)) and torch.isfinite(xbm(x, y))


@cuda
@pytest.mark.parametrize("gradient", ["paper", "autograd"])
@pytest.mark.parametrize("with_ref", [False, True])
def test_cuda_forward_backward_never_synchronises(gradient, with_ref):
    """The dense path reads nothing back to the host: no nonzero, no .item(), no data-dependent size."""
    x, y = batch(1024)
    x, y = x.cuda().requires_grad_(True), y.cuda()
    ref, ref_y = (x.detach()[:512].clone(), y[:512].clone()) if with_ref else (None, None)
    loss = losses.RankedListLoss(0.4, Tn=10, gradient=gradient)
    loss(x, y, ref_emb=ref, ref_labels=ref_y).backward()  # lazy initialisation (kernels, handles) may synchronise
    x.grad = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = loss(x, y, ref_emb=ref, ref_labels=ref_y)
        out.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(out) and torch.isfinite(x.grad).all()
