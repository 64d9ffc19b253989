"""NAMRReRankKNN.for_loss: the validated re-ranking, in the geometry the loss trained, with nothing to remember."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import distances, losses

from pml_rll.losses import NAMR_CONFIGS, NAMRLoss, make_namr_loss, namr_config, validated_retrieval
from pml_rll.losses.namr_loss import NAMR_VARIANTS, NASA_CONFIG
from pml_rll.retrieval import NAMRReRankKNN
from tests.reference import namr as ref

D = 4
# the geometry each bundled base trains: NASA's triplet recipe on raw distances, the others on normalised x
NORMALISED = {"triplet": False, "multi-similarity": True, "contrastive": True, "rll": True}


def _packed(n, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=dtype) * (1 + torch.rand(n, 1, generator=g, dtype=dtype) * 3)
    s = 0.2 + torch.rand(n, D, generator=g, dtype=dtype)
    return torch.cat([x, s], 1)


def _reference_search(packed, ref_packed, k, num_candidates, blend, normalise):
    """Slow and explicit: Euclidean candidates on x (normalised or not), re-ranked by the query's s."""
    out = []
    for q in packed:
        qx, qs = q[:D], q[D:]
        if normalise:
            qx = qx / qx.norm()
        rows = []
        for j, r in enumerate(ref_packed):
            rx = r[:D] / r[:D].norm() if normalise else r[:D]
            rows.append((float(((qx - rx) ** 2).sum()), j, rx))
        rows.sort(key=lambda t: (t[0], t[1]))
        cands = rows[: max(k, num_candidates)]
        scored = [(ref.rerank_sq_distance(qx, qs, rx, blend=blend), pos, j) for pos, (_, j, rx) in enumerate(cands)]
        scored.sort(key=lambda t: (t[0], t[1]))
        out.append([j for _, _, j in scored[:k]])
    return out


@pytest.mark.parametrize("base", NAMR_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_make_namr_loss_retrieves_as_validated_in_its_geometry(base, dtype):
    loss = make_namr_loss(base, D)
    settings = NAMR_CONFIGS[base]["retrieval"]
    assert loss.retrieval == settings and validated_retrieval(base) == settings
    assert isinstance(NAMRReRankKNN.for_loss(loss), NAMRReRankKNN)
    assert NAMRReRankKNN.for_loss(loss).mode == settings.get("mode", "rerank")
    knn = NAMRReRankKNN.for_loss(loss, mode="rerank")
    assert (knn.num_candidates, knn.weighting, knn.blend) == (
        settings["num_candidates"],
        settings["weighting"],
        settings["blend"],
    )
    assert knn.normalize_sample is NORMALISED[base] and loss.retrieval_normalize_sample is NORMALISED[base]
    loss.check_retrieval(knn)  # matches
    queries, gallery = _packed(5, 1, dtype), _packed(12, 2, dtype)
    k = 3
    _, idx = knn(queries, k, gallery)
    want = _reference_search(queries.double(), gallery.double(), k, knn.num_candidates, knn.blend, NORMALISED[base])
    assert idx.tolist() == want
    plain = NAMRReRankKNN.for_loss(loss, mode="plain")
    assert plain.mode == "plain" and plain.normalize_sample is NORMALISED[base]


def test_settings_are_read_where_they_are_kept(monkeypatch):
    # a later change of the validated configuration reaches every NAMRLoss built afterwards, with no second copy
    changed = {b: dict(c, retrieval=dict(c["retrieval"], num_candidates=5)) for b, c in NAMR_CONFIGS.items()}
    monkeypatch.setattr("pml_rll.losses.namr_loss.NAMR_CONFIGS", changed)
    assert NAMRReRankKNN.for_loss(make_namr_loss("contrastive", D)).num_candidates == 5
    assert NAMRReRankKNN.for_loss(NAMRLoss(losses.ContrastiveLoss(), D)).num_candidates == 5
    assert namr_config("multi-similarity")["retrieval"]["num_candidates"] == 5


def test_a_hand_built_namr_loss_gets_its_base_settings_and_geometry():
    # PML's default triplet distance normalises: the structure term and retrieval use normalised x
    loss = NAMRLoss(losses.TripletMarginLoss(), D)
    assert loss.structure_geometry == "l2" and NAMRReRankKNN.for_loss(loss).normalize_sample is True
    assert loss.retrieval == NAMR_CONFIGS["triplet"]["retrieval"]
    raw = NAMRLoss(losses.TripletMarginLoss(distance=distances.LpDistance(normalize_embeddings=False)), D)
    assert NAMRReRankKNN.for_loss(raw).normalize_sample is False
    other = NAMRLoss(losses.CircleLoss(), D)  # not a bundled base: NASA's re-ranking
    assert other.retrieval == NASA_CONFIG["retrieval"]
    own = NAMRLoss(losses.CircleLoss(), D, retrieval={"num_candidates": 16, "blend": 0.5})
    knn = NAMRReRankKNN.for_loss(own, blend=0.25)
    assert (knn.num_candidates, knn.blend, knn.weighting) == (16, 0.25, "query")


def test_a_geometry_mismatch_is_reported():
    loss = make_namr_loss("multi-similarity", D)
    with pytest.raises(ValueError, match="normalize_sample"):
        loss.check_retrieval(NAMRReRankKNN(D, **namr_config("multi-similarity")["retrieval"]))
    with pytest.raises(ValueError, match="normalize_sample=False does not match"):
        NAMRReRankKNN.for_loss(loss, normalize_sample=False)
    with pytest.raises(ValueError, match="embedding_size"):
        loss.check_retrieval(NAMRReRankKNN(D + 1, normalize_sample=True))
    with pytest.raises(TypeError, match="knn"):
        loss.check_retrieval(lambda *a: None)
    triplet = make_namr_loss("triplet", D)
    with pytest.raises(ValueError, match="normalize_sample"):
        triplet.check_retrieval(NAMRReRankKNN(D, normalize_sample=True))


@pytest.mark.parametrize(
    "retrieval, error, match",
    [
        ([8], TypeError, "retrieval"),
        ({"normalize_sample": True}, ValueError, "unknown keys"),
        ({"num_candidates": 0}, ValueError, "num_candidates"),
        ({"blend": 2.0}, ValueError, "blend"),
        ({"weighting": "both"}, ValueError, "weighting"),
        ({"mode": "fast"}, ValueError, "mode"),
    ],
)
def test_bad_retrieval_settings_raise_at_construction(retrieval, error, match):
    with pytest.raises(error, match=match):
        NAMRLoss(losses.ContrastiveLoss(), D, retrieval=retrieval)


def test_validated_retrieval_names():
    assert validated_retrieval("MultiSimilarityLoss") == NAMR_CONFIGS["multi-similarity"]["retrieval"]
    assert validated_retrieval(losses.CircleLoss()) == NASA_CONFIG["retrieval"]
    with pytest.raises(ValueError, match="unknown NAMR base"):
        validated_retrieval("circle")
    settings = validated_retrieval("rll")
    settings["num_candidates"] = 1  # a copy
    assert NAMR_CONFIGS["rll"]["retrieval"]["num_candidates"] != 1
