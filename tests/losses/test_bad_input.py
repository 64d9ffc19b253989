"""Bad input to every public loss: a TypeError/ValueError that names the argument, and no state changed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_metric_learning import distances
from pytorch_metric_learning import losses as pml_losses

from pml_rll.losses import CrossBatchMemory, MultiClusterRankingLoss, NAMRLoss, RankedListLoss, make_namr_loss

D = 4
NAN = float("nan")


def _emb(n=8, d=D, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _packed(n=8, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(n, d, generator=g), 0.5 + torch.rand(n, d, generator=g)], 1)


def _with(t, row, col, value):
    t = t.clone()
    t[row, col] = value
    return t


LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
T3 = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))

# (id, constructor call, exception, argument the message must name)
BAD_CONSTRUCTION = [
    ("rll margin str", lambda: RankedListLoss(margin="0.4"), TypeError, "margin"),
    ("rll margin bool", lambda: RankedListLoss(margin=True), TypeError, "margin"),
    ("rll margin negative", lambda: RankedListLoss(margin=-0.1), ValueError, "margin"),
    ("rll Tn negative", lambda: RankedListLoss(Tn=-1.0), ValueError, "Tn"),
    ("rll Tn huge", lambda: RankedListLoss(Tn=3.5e38), ValueError, "Tn"),
    ("rll Tn nan", lambda: RankedListLoss(Tn=NAN), ValueError, "Tn"),
    ("rll Tp negative", lambda: RankedListLoss(Tp=-0.5), ValueError, "Tp"),
    ("rll Tp too large", lambda: RankedListLoss(Tp=np.float64(2e4)), ValueError, "Tp"),
    ("rll imbalance", lambda: RankedListLoss(imbalance=1.5), ValueError, "imbalance"),
    ("rll margin huge", lambda: RankedListLoss(margin=1e40), ValueError, "margin"),
    ("rll alpha huge", lambda: RankedListLoss(alpha=1e40), ValueError, "alpha"),
    ("rll alpha zero", lambda: RankedListLoss(alpha=0.0), ValueError, "alpha"),
    ("rll alpha str", lambda: RankedListLoss(alpha="1"), TypeError, "alpha"),
    ("rll gradient", lambda: RankedListLoss(gradient="fast"), ValueError, "gradient"),
    ("rll gradient None", lambda: RankedListLoss(gradient=None), ValueError, "gradient"),
    ("rll similarity", lambda: RankedListLoss(distance=distances.CosineSimilarity()), ValueError, "distance"),
    ("mcr size 0", lambda: MultiClusterRankingLoss(0), ValueError, "embedding_size"),
    ("mcr size float", lambda: MultiClusterRankingLoss(4.0), TypeError, "embedding_size"),
    ("mcr size bool", lambda: MultiClusterRankingLoss(True), TypeError, "embedding_size"),
    ("mcr t_values str", lambda: MultiClusterRankingLoss(D, t_values="03"), TypeError, "t_values"),
    ("mcr t_values empty", lambda: MultiClusterRankingLoss(D, t_values=()), ValueError, "t_values"),
    ("mcr t_values nan", lambda: MultiClusterRankingLoss(D, t_values=(0, NAN)), ValueError, "t_values"),
    ("mcr t_values repeated", lambda: MultiClusterRankingLoss(D, t_values=(3, 3.0)), ValueError, "t_values"),
    ("mcr t_values huge", lambda: MultiClusterRankingLoss(D, t_values=(0, 1e30)), ValueError, "t_values"),
    ("mcr alpha zero", lambda: MultiClusterRankingLoss(D, alpha=0), ValueError, "alpha"),
    ("mcr alpha huge", lambda: MultiClusterRankingLoss(D, alpha=1e38), ValueError, "alpha"),
    ("mcr alpha bool", lambda: MultiClusterRankingLoss(D, alpha=True), TypeError, "alpha"),
    ("mcr floor negative", lambda: MultiClusterRankingLoss(D, floor=-0.1), ValueError, "floor"),
    ("mcr diagonal int", lambda: MultiClusterRankingLoss(D, stats_include_diagonal=1), TypeError, "diagonal"),
    ("namr loss None", lambda: NAMRLoss(None, D), TypeError, "loss"),
    ("namr size 0", lambda: NAMRLoss(RankedListLoss(), 0), ValueError, "embedding_size"),
    ("namr size float", lambda: NAMRLoss(RankedListLoss(), 2.5), TypeError, "embedding_size"),
    ("namr weight bool", lambda: NAMRLoss(RankedListLoss(), D, structure_weight=True), TypeError, "structure_weight"),
    (
        "namr weight negative",
        lambda: NAMRLoss(RankedListLoss(), D, structure_weight=-1),
        ValueError,
        "structure_weight",
    ),
    ("namr weight str", lambda: NAMRLoss(RankedListLoss(), D, structure_weight="2"), TypeError, "structure_weight"),
    ("namr weight nan", lambda: NAMRLoss(RankedListLoss(), D, structure_weight=NAN), ValueError, "structure_weight"),
    ("namr weight huge", lambda: NAMRLoss(RankedListLoss(), D, structure_weight=1e40), ValueError, "structure_weight"),
    ("namr structure_loss", lambda: NAMRLoss(RankedListLoss(), D, structure_loss="mcr"), TypeError, "structure_loss"),
    (
        "namr structure size",
        lambda: NAMRLoss(RankedListLoss(), D, structure_loss=MultiClusterRankingLoss(D + 1)),
        ValueError,
        "embedding_size",
    ),
    ("namr miner", lambda: NAMRLoss(RankedListLoss(), D, miner=3), TypeError, "miner"),
    ("namr scale str", lambda: NAMRLoss(RankedListLoss(), D, scale_by_mean_distance="yes"), TypeError, "scale_by"),
    ("namr geometry", lambda: NAMRLoss(RankedListLoss(), D, structure_geometry="cos"), ValueError, "geometry"),
    ("make_namr None", lambda: make_namr_loss(None, D), TypeError, "base_name"),
    ("make_namr unknown", lambda: make_namr_loss("arcface", D), ValueError, "base loss"),
    ("make_namr size", lambda: make_namr_loss("rll", 0), ValueError, "embedding_size"),
    ("cbm loss None", lambda: CrossBatchMemory(None, D), TypeError, "loss"),
    ("cbm pml rll", lambda: CrossBatchMemory(pml_losses.RankedListLoss(0.4, 1.0), D), ValueError, "RankedListLoss"),
    ("cbm size 0", lambda: CrossBatchMemory(RankedListLoss(), 0), ValueError, "embedding_size"),
    ("cbm size float", lambda: CrossBatchMemory(RankedListLoss(), 4.0), TypeError, "embedding_size"),
    ("cbm memory 0", lambda: CrossBatchMemory(RankedListLoss(), D, memory_size=0), ValueError, "memory_size"),
    ("cbm memory str", lambda: CrossBatchMemory(RankedListLoss(), D, memory_size="8"), TypeError, "memory_size"),
    ("cbm miner", lambda: CrossBatchMemory(RankedListLoss(), D, miner="all"), TypeError, "miner"),
]


def test_bad_construction(bad_construction, rejects):
    rejects(*bad_construction)


def test_numpy_hyper_parameters_are_accepted():
    loss = RankedListLoss(margin=np.float32(0.4), Tn=np.int64(10), Tp=np.float64(0.0), imbalance=np.float32(0.5))
    assert (loss.margin, loss.Tn) == (pytest.approx(0.4), 10.0)
    mcr = MultiClusterRankingLoss(np.int64(D), t_values=np.array([0.0, 3.0]), alpha=np.float32(10))
    assert type(mcr.embedding_size) is int and mcr.t_values == (0.0, 3.0)
    namr = NAMRLoss(RankedListLoss(), np.int32(D), structure_weight=np.float64(2.0))
    assert type(namr.embedding_size) is int and namr.structure_weight == 2.0
    cbm = CrossBatchMemory(RankedListLoss(), np.int64(D), memory_size=np.int32(16))
    assert (cbm.embedding_size, cbm.memory_size) == (D, 16) and cbm.embedding_memory.shape == (16, D)


def _rll():
    return RankedListLoss(collect_stats=True)


def _mcr():
    return MultiClusterRankingLoss(D, collect_stats=True)


def _namr():
    return NAMRLoss(RankedListLoss(collect_stats=True), D)


def _namr_contrastive():
    return NAMRLoss(pml_losses.ContrastiveLoss(), D)


def _cbm():
    return CrossBatchMemory(RankedListLoss(collect_stats=True), D, memory_size=12)


E, P = _emb(), _packed()
# (id, loss factory, a good call, the bad call, exception, argument named)
BAD_CALLS = [
    ("rll embeddings list", _rll, (E, LABELS), (E.tolist(), LABELS), TypeError, "embeddings"),
    ("rll embeddings 1-D", _rll, (E, LABELS), (E[0], LABELS[:1]), ValueError, "embeddings"),
    ("rll embeddings 3-D", _rll, (E, LABELS), (E[None], LABELS), ValueError, "embeddings"),
    ("rll embeddings int", _rll, (E, LABELS), (E.long(), LABELS), TypeError, "embeddings"),
    ("rll embeddings width 0", _rll, (E, LABELS), (E[:, :0], LABELS), ValueError, "embeddings"),
    ("rll embeddings nan", _rll, (E, LABELS), (_with(E, 3, 1, NAN), LABELS), ValueError, "embeddings"),
    ("rll embeddings inf", _rll, (E, LABELS), (_with(E, 0, 0, float("inf")), LABELS), ValueError, "embeddings"),
    ("rll labels list", _rll, (E, LABELS), (E, LABELS.tolist()), TypeError, "labels"),
    ("rll labels numpy", _rll, (E, LABELS), (E, LABELS.numpy()), TypeError, "labels"),
    ("rll labels float", _rll, (E, LABELS), (E, LABELS.float()), TypeError, "labels"),
    ("rll labels 2-D", _rll, (E, LABELS), (E, LABELS[:, None]), ValueError, "labels"),
    ("rll labels short", _rll, (E, LABELS), (E, LABELS[:-1]), ValueError, "labels"),
    ("rll no labels no pairs", _rll, (E, LABELS), (E,), ValueError, "labels"),
    ("rll ref_emb width", _rll, (E, LABELS), (E, LABELS, None, _emb(5, D + 1), LABELS[:5]), ValueError, "ref_emb"),
    ("rll ref_emb nan", _rll, (E, LABELS), (E, LABELS, None, _with(E, 7, 0, NAN), LABELS), ValueError, "ref_emb"),
    ("rll ref_emb int", _rll, (E, LABELS), (E, LABELS, None, E.int(), LABELS), TypeError, "ref_emb"),
    ("rll ref_emb no ref_labels", _rll, (E, LABELS), (E, LABELS, None, E), ValueError, "ref_labels"),
    ("rll ref_labels no ref_emb", _rll, (E, LABELS), (E, LABELS, None, None, LABELS), ValueError, "ref_labels"),
    ("rll ref_labels short", _rll, (E, LABELS), (E, LABELS, None, E, LABELS[:3]), ValueError, "ref_labels"),
    ("rll pairs not a tuple", _rll, (E, LABELS), (E, None, torch.arange(3)), TypeError, "indices_tuple"),
    ("rll pairs float", _rll, (E, LABELS), (E, None, (T3[0].float(), T3[1], T3[2])), TypeError, "indices_tuple"),
    ("rll pairs range", _rll, (E, LABELS), (E, None, (T3[0], T3[1], T3[2] + 20)), ValueError, "indices_tuple"),
    ("rll pairs overlap", _rll, (E, LABELS), (E, None, T3[:2] + T3[:2]), ValueError, "indices_tuple"),
    ("mcr width", _mcr, (P,), (P[:, :-1],), ValueError, "embeddings"),
    ("mcr nan", _mcr, (P,), (_with(P, 2, 1, NAN),), ValueError, "embeddings"),
    ("mcr s zero", _mcr, (P,), (_with(P, 2, D, 0.0),), ValueError, "strictly positive"),
    ("mcr one row", _mcr, (P,), (P[:1],), ValueError, "at least 2"),
    ("mcr int", _mcr, (P,), (P.long(),), TypeError, "embeddings"),
    ("mcr labels list", _mcr, (P,), (P, LABELS.tolist()), TypeError, "labels"),
    ("mcr indices_tuple", _mcr, (P,), (P, None, T3), ValueError, "indices_tuple"),
    ("mcr ref_emb", _mcr, (P,), (P, None, None, P), ValueError, "ref_emb"),
    ("namr width", _namr, (P, LABELS), (E, LABELS), ValueError, "2 * embedding_size"),
    ("namr nan", _namr, (P, LABELS), (_with(P, 1, 2, NAN), LABELS), ValueError, "embeddings"),
    ("namr s negative", _namr, (P, LABELS), (_with(P, 1, D + 2, -1.0), LABELS), ValueError, "strictly positive"),
    ("namr labels list", _namr, (P, LABELS), (P, LABELS.tolist()), TypeError, "labels"),
    ("namr labels short", _namr, (P, LABELS), (P, LABELS[:-2]), ValueError, "labels"),
    ("namr no labels", _namr, (P, LABELS), (P,), ValueError, "labels"),
    ("namr one row", _namr, (P, LABELS), (P[:1], LABELS[:1]), ValueError, "at least 2"),
    ("namr ref width", _namr, (P, LABELS), (P, LABELS, None, _emb(5, 5), LABELS[:5]), ValueError, "ref_emb"),
    ("namr ref no labels", _namr, (P, LABELS), (P, LABELS, None, P), ValueError, "ref_labels"),
    ("namr pairs range", _namr, (P, LABELS), (P, LABELS, (T3[0] + 9, T3[1], T3[2])), ValueError, "indices_tuple"),
    (
        "namr contrastive ref nan",
        _namr_contrastive,
        (P, LABELS),
        (P, LABELS, None, torch.full((5, D), NAN), torch.arange(5)),
        ValueError,
        "ref_emb",
    ),
    ("cbm nan", _cbm, (E, LABELS), (_with(E, 5, 3, NAN), LABELS), ValueError, "embeddings"),
    ("cbm width", _cbm, (E, LABELS), (_emb(8, D + 1), LABELS), ValueError, "embedding_size"),
    ("cbm batch > memory", _cbm, (E, LABELS), (_emb(13), torch.arange(13)), ValueError, "memory_size"),
    ("cbm labels None", _cbm, (E, LABELS), (E, None), ValueError, "labels"),
    ("cbm labels list", _cbm, (E, LABELS), (E, LABELS.tolist()), TypeError, "labels"),
    ("cbm labels float", _cbm, (E, LABELS), (E, LABELS.float()), TypeError, "labels"),
    ("cbm labels short", _cbm, (E, LABELS), (E, LABELS[:4]), ValueError, "labels"),
    ("cbm mask int", _cbm, (E, LABELS), (E, LABELS, None, torch.ones(8, dtype=torch.long)), TypeError, "enqueue_mask"),
    (
        "cbm mask short",
        _cbm,
        (E, LABELS),
        (E, LABELS, None, torch.ones(7, dtype=torch.bool)),
        ValueError,
        "enqueue_mask",
    ),
    ("cbm pairs list", _cbm, (E, LABELS), (E, LABELS, [0, 1, 2]), TypeError, "indices_tuple"),
    ("cbm pairs float", _cbm, (E, LABELS), (E, LABELS, tuple(t.float() for t in T3)), TypeError, "indices_tuple"),
    ("cbm pairs range", _cbm, (E, LABELS), (E, LABELS, (T3[0], T3[1], T3[2] + 30)), ValueError, "indices_tuple"),
    (
        "cbm mask and pairs",
        _cbm,
        (E, LABELS),
        (E, LABELS, T3, torch.ones(8, dtype=torch.bool)),
        ValueError,
        "enqueue_mask",
    ),
]


@pytest.mark.parametrize("case", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_call_raises_and_changes_nothing(case, rejects, one_thread):
    _, make, good, bad, exc, name = case
    loss = make()
    loss(*good)  # statistics, recorded values and the memory hold something to keep
    rejects(lambda: loss(*bad), exc, name, obj=loss)
    loss(*good)  # and the loss still works


class _RefusingLoss(RankedListLoss):
    """A loss that refuses every batch after CrossBatchMemory enqueued it."""

    def compute_loss(self, *args):
        raise RuntimeError("refused")


def test_cross_batch_memory_restores_the_memory_when_the_loss_refuses(unchanged):
    cbm = CrossBatchMemory(_RefusingLoss(), D, memory_size=12)
    with unchanged(cbm), pytest.raises(RuntimeError, match="refused"):
        cbm(E, LABELS)
    cbm = CrossBatchMemory(RankedListLoss(), D, memory_size=12)
    cbm(E, LABELS)  # fills 8 of 12 slots; the next batch wraps around
    cbm.loss = _RefusingLoss()
    with unchanged(cbm), pytest.raises(RuntimeError, match="refused"):
        cbm(_emb(8, seed=1), LABELS)


def test_cross_batch_memory_recovers_after_a_nan_batch():
    """The issue's case: a NaN batch was enqueued and every later clean batch failed."""
    cbm = CrossBatchMemory(RankedListLoss(), D, memory_size=16)
    with pytest.raises(ValueError, match="embeddings"):
        cbm(_with(E, 0, 0, NAN), LABELS)
    assert cbm.queue_idx == 0 and not cbm.has_been_filled
    for seed in range(4):
        assert torch.isfinite(cbm(_emb(seed=seed), LABELS))


def test_references_of_another_dtype_are_cast_to_the_embeddings_dtype():
    ref = _packed(6, seed=3)
    for loss in (_namr(), _namr_contrastive()):
        expected = loss(P, LABELS, None, ref, torch.arange(6) % 4)
        torch.testing.assert_close(loss(P, LABELS, None, ref.double(), torch.arange(6) % 4), expected)
