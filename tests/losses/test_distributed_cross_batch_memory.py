"""DistributedCrossBatchMemory: 2 gloo processes hold the same memory as one process fed the global batches."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_metric_learning import losses as pml_losses

from pml_rll import losses

WORLD, LOCAL, STEPS, MEMORY, DIM = 2, 8, 4, 40, 6  # the 16-row global batches wrap around the memory at step 3
LOSSES = ("rll", "contrastive")


def _batches():
    g = torch.Generator().manual_seed(0)
    n = WORLD * LOCAL
    return [(torch.randn(n, DIM, generator=g), torch.randint(0, 4, (n,), generator=g)) for _ in range(STEPS)]


def _make(loss_name, gather=True):
    base = losses.RankedListLoss(0.4, Tn=10) if loss_name == "rll" else pml_losses.ContrastiveLoss()
    return losses.DistributedCrossBatchMemory(base, DIM, memory_size=MEMORY, gather_distributed=gather)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    for loss_name in LOSSES:
        _steps(rank, loss_name, f"{path}.{loss_name}")
    small = losses.DistributedCrossBatchMemory(losses.RankedListLoss(0.4), DIM, memory_size=WORLD * LOCAL - 1)
    x, y = _batches()[0]
    try:  # each rank's batch fits, the global batch does not
        small(x[:LOCAL], y[:LOCAL])
        refused = ""
    except ValueError as e:
        refused = str(e)
    torch.save((refused, int(small.queue_idx)), f"{path}.small.{rank}")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown, where gloo's threads sometimes abort the process after the work is done


def _steps(rank, loss_name, path):
    xbm, per_rank = _make(loss_name), _make(loss_name, gather=False)
    out = []
    for x, y in _batches():
        q = x[rank * LOCAL : (rank + 1) * LOCAL].clone().requires_grad_(True)
        loss = xbm(q, y[rank * LOCAL : (rank + 1) * LOCAL])
        loss.backward()
        out.append((loss.detach(), q.grad, xbm.embedding_memory.clone(), xbm.label_memory.clone(), xbm.queue_idx))
        per_rank(q.detach(), y[rank * LOCAL : (rank + 1) * LOCAL])
    torch.save((out, per_rank.embedding_memory), f"{path}.{rank}")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("xbm") / "xbm")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    mp.spawn(_worker, args=(_free_port(), path), nprocs=WORLD, join=True)
    torch.set_num_threads(old)
    return path


@pytest.mark.parametrize("loss_name", LOSSES)
def test_every_rank_holds_the_memory_of_one_process_on_the_global_batch(loss_name, two_ranks, one_thread):
    ranks, per_rank = zip(*(torch.load(f"{two_ranks}.{loss_name}.{r}") for r in range(WORLD)))
    assert not torch.equal(per_rank[0], per_rank[1])  # gather_distributed=False: each rank keeps its own shards
    single = _make(loss_name)
    for step, (x, y) in enumerate(_batches()):
        q = x.clone().requires_grad_(True)
        loss = single(q, y)
        loss.backward()
        for r in range(WORLD):
            _, grad, memory, labels, queue_idx = ranks[r][step]
            assert torch.equal(memory, single.embedding_memory) and torch.equal(labels, single.label_memory)
            assert queue_idx == single.queue_idx
            if loss_name == "rll":  # a mean over queries: each rank's share, DDP's average gives the full gradient
                assert torch.allclose(grad / WORLD, q.grad[r * LOCAL : (r + 1) * LOCAL], atol=1e-6)
        if loss_name == "rll":
            mean = sum(ranks[r][step][0] for r in range(WORLD)) / WORLD
            assert torch.allclose(mean, loss.detach(), atol=1e-6)
    assert single.has_been_filled  # the memory wrapped around during the test


def test_a_global_batch_larger_than_the_memory_is_refused(two_ranks):
    for r in range(WORLD):
        refused, queue_idx = torch.load(f"{two_ranks}.small.{r}")
        assert "exceeds memory_size" in refused and queue_idx == 0


def test_without_process_group_it_is_the_plain_memory():
    x, y = _batches()[0]
    a = losses.DistributedCrossBatchMemory(losses.RankedListLoss(0.4), DIM, memory_size=MEMORY)
    b = losses.CrossBatchMemory(losses.RankedListLoss(0.4), DIM, memory_size=MEMORY)
    assert a(x, y).item() == b(x, y).item() and torch.equal(a.embedding_memory, b.embedding_memory)
    with pytest.raises(TypeError, match="gather_distributed"):
        losses.DistributedCrossBatchMemory(losses.RankedListLoss(0.4), DIM, gather_distributed=1)
