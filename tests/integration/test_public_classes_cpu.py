"""Every public loss, reducer, miner and NAMR class runs forward and backward on a CPU in float32 and float64.

A check of the install on any supported torch release (CI runs it on the oldest and on the pinned one): each result
keeps the input's dtype, is finite and positive, and moves every input that should move; the Ranked List Loss equals
the slow reference.
"""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

from pml_rll.losses import CrossBatchMemory, MultiClusterRankingLoss, NAMRLoss, RankedListLoss
from pml_rll.miners import RankedListMiner, SampleEmbeddingMiner
from pml_rll.modules import NAMREmbedder, StructureEmbeddingHead
from pml_rll.reducers import RankedListReducer
from pml_rll.retrieval import NAMRReRankKNN, StructureWeightedDistance
from tests.conftest import paired_batch, sample_and_structure
from tests.reference.ranked_list_loss import reference_loss

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


def _moves(t):
    return t.grad is not None and bool(torch.isfinite(t.grad).all()) and bool(torch.count_nonzero(t.grad) > 0)


def _check(loss, x, dtype):
    assert loss.dtype == dtype and loss.ndim == 0
    assert bool(torch.isfinite(loss)) and loss.item() > 0
    loss.backward()
    assert _moves(x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ranked_list_loss(dtype):
    x, y = paired_batch(dtype=dtype)
    for path in ("list", "dense", "split"):
        xl = _leaf(x)
        loss = RankedListLoss(margin=0.4, Tn=10.0, path=path)(xl, y)
        assert loss.item() == pytest.approx(reference_loss(x.double(), y).item(), rel=TOL[dtype], abs=TOL[dtype])
        _check(loss, xl, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reducer_under_a_pml_pair_loss(dtype):
    x, y = paired_batch(dtype=dtype)
    xl = _leaf(x)
    pair_loss = pml_losses.ContrastiveLoss(pos_margin=0.8, neg_margin=1.2, reducer=RankedListReducer(Tn=10.0))
    loss = pair_loss(xl, y)
    # ContrastiveLoss(pos_margin=alpha - margin, neg_margin=alpha) reduced this way is the Ranked List Loss
    assert loss.item() == pytest.approx(reference_loss(x.double(), y).item(), rel=TOL[dtype], abs=TOL[dtype])
    _check(loss, xl, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_miner_feeding_a_pml_loss(dtype):
    x, y = paired_batch(dtype=dtype)
    xl = _leaf(x)
    pairs = RankedListMiner(margin=0.4)(xl, y)
    assert all(len(p) > 0 for p in pairs)
    _check(pml_losses.ContrastiveLoss(pos_margin=0.8, neg_margin=1.2)(xl, y, pairs), xl, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_batch_memory_with_the_ranked_list_loss(dtype):
    x, y = paired_batch(n=40, dtype=dtype)
    xbm = CrossBatchMemory(RankedListLoss(margin=0.4, Tn=10.0), embedding_size=x.shape[1], memory_size=64)
    xbm(x[:20], y[:20])  # fill part of the memory
    assert xbm.embedding_memory.dtype == dtype
    xl = _leaf(x[20:])
    _check(xbm(xl, y[20:]), xl, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_namr_embedder_loss_miner_and_retrieval(dtype):
    torch.manual_seed(0)
    d = 6
    features, _ = sample_and_structure(24, 10, seed=1, dtype=dtype)
    labels = torch.arange(6).repeat_interleave(4)
    embedder = NAMREmbedder(10, embedding_size=d).to(dtype)
    packed = embedder(features)
    assert packed.dtype == dtype and packed.shape == (24, 2 * d)
    miner = SampleEmbeddingMiner(pml_miners.MultiSimilarityMiner(epsilon=0.5), d)
    base = pml_losses.TripletMarginLoss(margin=0.2, distance=distances.LpDistance(normalize_embeddings=False))
    loss_fn = NAMRLoss(base, d)
    loss = loss_fn(packed, labels, miner(packed, labels))
    assert loss.dtype == dtype and bool(torch.isfinite(loss)) and loss.item() > 0
    assert loss_fn.structure_loss_value > 0
    loss.backward()
    assert all(_moves(p) for p in embedder.sample_head.parameters())
    assert any(_moves(p) for p in embedder.structure_head.parameters())
    with torch.no_grad():
        packed = embedder(features)
    distances_, indices = NAMRReRankKNN(d, num_candidates=8)(packed, 3, packed, True)
    assert distances_.shape == indices.shape == (24, 3)
    assert bool(torch.isfinite(distances_).all()) and not bool((indices == torch.arange(24)[:, None]).any())


@pytest.mark.parametrize("dtype", DTYPES)
def test_structure_head_multi_cluster_loss_and_weighted_distance(dtype):
    d = 5
    features, _ = sample_and_structure(16, 8, seed=2, dtype=dtype)
    x, _ = sample_and_structure(16, d, seed=3, dtype=dtype)
    head = StructureEmbeddingHead(8, d).to(dtype)
    s = head(features)
    assert s.dtype == dtype and bool((s > 0).all())
    xl = _leaf(x)
    loss = MultiClusterRankingLoss(d)(torch.cat([xl, s], 1))
    _check(loss, xl, dtype)
    assert any(_moves(p) for p in head.parameters())
    packed = torch.cat([x, s.detach()], 1)
    mat = StructureWeightedDistance(d)(packed)
    assert mat.dtype == dtype and mat.shape == (16, 16) and bool(torch.isfinite(mat).all())
