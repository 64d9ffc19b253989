"""Bad input to the miners: a TypeError/ValueError that names the argument (no NaN row silently dropped), and no
statistic changed."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import distances, miners

from pml_rll.miners import RankedListMiner, SampleEmbeddingMiner

D = 4
NAN = float("nan")
G = torch.Generator().manual_seed(0)
E = torch.randn(8, D, generator=G)
P = torch.cat([E, 0.5 + torch.rand(8, D, generator=G)], 1)
LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


def _with(t, row, col, value):
    t = t.clone()
    t[row, col] = value
    return t


BAD_CONSTRUCTION = [
    ("rlm margin negative", lambda: RankedListMiner(margin=-1.0), ValueError, "margin"),
    ("rlm margin str", lambda: RankedListMiner(margin="0.4"), TypeError, "margin"),
    ("rlm alpha zero", lambda: RankedListMiner(alpha=0.0), ValueError, "alpha"),
    ("rlm alpha bool", lambda: RankedListMiner(alpha=True), TypeError, "alpha"),
    ("rlm alpha huge", lambda: RankedListMiner(alpha=1e40), ValueError, "alpha"),
    ("rlm margin huge", lambda: RankedListMiner(margin=1e40), ValueError, "margin"),
    ("rlm similarity", lambda: RankedListMiner(distance=distances.DotProductSimilarity()), ValueError, "distance"),
    ("sem miner None", lambda: SampleEmbeddingMiner(None, D), TypeError, "miner"),
    ("sem size 0", lambda: SampleEmbeddingMiner(miners.MultiSimilarityMiner(), 0), ValueError, "embedding_size"),
    ("sem size float", lambda: SampleEmbeddingMiner(miners.MultiSimilarityMiner(), 4.0), TypeError, "embedding_size"),
    (
        "sem scale int",
        lambda: SampleEmbeddingMiner(miners.MultiSimilarityMiner(), D, scale_by_mean_distance=1),
        TypeError,
        "scale_by_mean_distance",
    ),
]


def test_bad_construction(bad_construction, rejects):
    rejects(*bad_construction)


def _rlm():
    return RankedListMiner(collect_stats=True)


def _sem():
    return SampleEmbeddingMiner(miners.MultiSimilarityMiner(collect_stats=True), D, scale_by_mean_distance=True)


# (id, miner factory, a good call, the bad call, exception, argument named)
BAD_CALLS = [
    ("rlm nan row", _rlm, (E, LABELS), (_with(E, 2, 0, NAN), LABELS), ValueError, "embeddings"),
    ("rlm inf row", _rlm, (E, LABELS), (_with(E, 7, 3, float("inf")), LABELS), ValueError, "embeddings"),
    ("rlm 1-D", _rlm, (E, LABELS), (E[0], LABELS[:1]), ValueError, "embeddings"),
    ("rlm 3-D", _rlm, (E, LABELS), (E[None], LABELS), ValueError, "embeddings"),
    ("rlm int", _rlm, (E, LABELS), (E.long(), LABELS), TypeError, "embeddings"),
    ("rlm list", _rlm, (E, LABELS), (E.tolist(), LABELS), TypeError, "embeddings"),
    ("rlm labels None", _rlm, (E, LABELS), (E, None), ValueError, "labels"),
    ("rlm labels list", _rlm, (E, LABELS), (E, LABELS.tolist()), TypeError, "labels"),
    ("rlm labels float", _rlm, (E, LABELS), (E, LABELS.double()), TypeError, "labels"),
    ("rlm labels short", _rlm, (E, LABELS), (E, LABELS[:5]), ValueError, "labels"),
    ("rlm ref width", _rlm, (E, LABELS), (E, LABELS, torch.randn(3, D + 1), torch.arange(3)), ValueError, "ref_emb"),
    ("rlm ref nan", _rlm, (E, LABELS), (E, LABELS, _with(E, 1, 1, NAN), LABELS), ValueError, "ref_emb"),
    ("rlm ref no labels", _rlm, (E, LABELS), (E, LABELS, E), ValueError, "ref_labels"),
    ("rlm ref_labels alone", _rlm, (E, LABELS), (E, LABELS, None, LABELS), ValueError, "ref_labels"),
    ("sem width", _sem, (P, LABELS), (E, LABELS), ValueError, "2 * embedding_size"),
    ("sem nan in x", _sem, (P, LABELS), (_with(P, 3, 0, NAN), LABELS), ValueError, "embeddings"),
    ("sem nan in s", _sem, (P, LABELS), (_with(P, 3, D, NAN), LABELS), ValueError, "embeddings"),
    ("sem int", _sem, (P, LABELS), (P.int(), LABELS), TypeError, "embeddings"),
    ("sem labels None", _sem, (P, LABELS), (P, None), ValueError, "labels"),
    ("sem labels list", _sem, (P, LABELS), (P, LABELS.tolist()), TypeError, "labels"),
    ("sem ref width", _sem, (P, LABELS), (P, LABELS, torch.randn(3, 5), torch.arange(3)), ValueError, "ref_emb"),
    ("sem ref nan", _sem, (P, LABELS), (P, LABELS, _with(E, 0, 0, NAN), LABELS), ValueError, "ref_emb"),
    ("sem one row scaled", _sem, (P, LABELS), (P[:1], LABELS[:1]), ValueError, "at least 2"),
]


@pytest.mark.parametrize("case", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_call_raises_and_changes_nothing(case, rejects):
    _, make, good, bad, exc, name = case
    miner = make()
    miner(*good)
    rejects(lambda: miner(*bad), exc, name, obj=miner)
    miner(*good)


def test_sample_part_reference_is_accepted():
    out = _sem()(P, LABELS, E, LABELS)
    assert len(out) == 4


def test_a_reference_of_another_dtype_is_cast():
    miner = SampleEmbeddingMiner(miners.MultiSimilarityMiner(), D)
    expected = miner(P, LABELS, E, LABELS)
    for a, b in zip(miner(P, LABELS, E.half(), LABELS), expected):
        assert torch.equal(a, b)
