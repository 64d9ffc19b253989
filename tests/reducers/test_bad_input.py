"""Bad input to RankedListReducer: a TypeError/ValueError that names the argument, and no statistic changed."""

from __future__ import annotations

import numpy as np
import torch
from pytorch_metric_learning import losses

from pml_rll.reducers import RankedListReducer

BAD_CONSTRUCTION = [
    ("Tn negative", lambda: RankedListReducer(Tn=-1.0), ValueError, "Tn"),
    ("Tn huge", lambda: RankedListReducer(Tn=3.5e38), ValueError, "Tn"),
    ("Tn bool", lambda: RankedListReducer(Tn=True), TypeError, "Tn"),
    ("Tp too large", lambda: RankedListReducer(Tp=2e4), ValueError, "Tp"),
    ("Tp str", lambda: RankedListReducer(Tp="0"), TypeError, "Tp"),
    ("imbalance", lambda: RankedListReducer(imbalance=-0.1), ValueError, "imbalance"),
    ("gradient", lambda: RankedListReducer(gradient="exact"), ValueError, "gradient"),
]


def test_bad_construction(bad_construction, rejects):
    rejects(*bad_construction)


def test_numpy_temperatures_are_accepted():
    r = RankedListReducer(Tp=np.float32(0.0), Tn=np.int64(10), imbalance=np.float64(0.5))
    assert (r.Tp, r.Tn, r.imbalance) == (0.0, 10.0, 0.5)


def _loss_dict(embeddings, labels):
    return losses.ContrastiveLoss(pos_margin=0.8, neg_margin=1.2).compute_loss(
        embeddings, labels, None, embeddings, labels
    )


def test_bad_calls_raise_and_change_nothing(rejects):
    e = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    reducer = RankedListReducer(collect_stats=True)
    good = _loss_dict(e, labels)
    reducer(good, e, labels)
    nan = {k: dict(v) for k, v in good.items()}
    nan["neg_loss"]["losses"] = nan["neg_loss"]["losses"].clone()
    nan["neg_loss"]["losses"][0] = float("nan")
    rejects(lambda: reducer(nan, e, labels), ValueError, "loss_dict['neg_loss']", obj=reducer)
    rejects(lambda: reducer(list(good.values()), e, labels), TypeError, "loss_dict", obj=reducer)
    rejects(lambda: reducer({"loss": 3.0}, e, labels), TypeError, "loss_dict['loss']", obj=reducer)
    rejects(lambda: reducer(good, e[0], labels), ValueError, "embeddings", obj=reducer)
    rejects(lambda: reducer(good, e.tolist(), labels), TypeError, "embeddings", obj=reducer)
    assert torch.isfinite(reducer(good, e, labels))
