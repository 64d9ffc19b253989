"""The Ranked List Loss inside PML's DistributedLossWrapper: 2 processes, gloo, CPU."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_metric_learning.utils import distributed as pml_dist

from pml_rll import losses
from tests.reference.ranked_list_loss import reference_loss

F64 = torch.float64


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
        elif gradient == "paper":
            # efficient mode: each rank's queries against every rank's embeddings, the loss of its half of the
            # queries times the world size (PML's convention); with the paper's rule the gallery end gets no
            # gradient, so the averaged gradient is exactly the world size times the full batch's
            assert torch.allclose(gw, 2 * model.weight.grad, atol=1e-12)
            assert torch.allclose(gb, 2 * model.bias.grad, atol=1e-12)
        else:
            # autograd rule, efficient mode: rank r's loss is 2 x the mean loss of its queries against every
            # embedding, only its own part of the gallery carrying gradient; DDP averages the ranks' gradients.
            # The same by the loop reference, in one process.
            ref_model = torch.nn.Linear(10, 8).double()
            ref_model.load_state_dict(init)
            emb = ref_model(x)
            total = torch.zeros((), dtype=F64)
            for r in range(2):
                local = slice(16 * r, 16 * (r + 1))
                gallery = torch.cat(
                    [emb[:16] if r == 0 else emb[:16].detach(), emb[16:] if r == 1 else emb[16:].detach()]
                )
                total = total + reference_loss(emb[local], y[local], Tn=10, ref=gallery, ref_labels=y)  # 2 x ... / 2
            total.backward()
            assert not torch.allclose(ref_model.weight.grad, 2 * model.weight.grad, atol=1e-6)  # not 2 x the full batch
            assert torch.allclose(gw, ref_model.weight.grad, atol=1e-10)
            assert torch.allclose(gb, ref_model.bias.grad, atol=1e-10)
