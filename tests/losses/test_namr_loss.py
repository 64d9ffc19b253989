"""NAMRLoss wrapper, make_namr_loss and SampleEmbeddingMiner (docs/namr.md, sections 4.1, 4.6 and 7)."""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import distances, losses, miners, reducers

from pml_rll.functional import namr as F_namr
from pml_rll.losses import MultiClusterRankingLoss, NAMRLoss, RankedListLoss, make_namr_loss
from pml_rll.losses.namr_loss import NAMR_VARIANTS
from pml_rll.miners import SampleEmbeddingMiner
from tests.conftest import sample_and_structure

D = 6


def test_mean_pairwise_distance_is_the_off_diagonal_mean():
    # docs/namr.md, section 4.1: the scale is the mean Euclidean distance over the ordered pairs i != j
    # (an independent loop)
    x = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    pairs = [float(torch.sqrt(((x[i] - x[j]) ** 2).sum())) for i in range(7) for j in range(7) if i != j]
    assert F_namr.mean_pairwise_distance(x).item() == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)


def _batch(n=16, seed=0, dtype=torch.float64):
    x, s = sample_and_structure(n, D, seed, dtype, scale=3.0)
    return x, s, torch.arange(n) // 4


def _base_losses():
    return [
        losses.TripletMarginLoss(margin=0.2, distance=distances.LpDistance(normalize_embeddings=False)),
        losses.MultiSimilarityLoss(),
        losses.ContrastiveLoss(),
        RankedListLoss(margin=0.4, Tn=10.0),
    ]


@pytest.mark.parametrize("base", _base_losses(), ids=lambda l: type(l).__name__)
@pytest.mark.parametrize("scale", [False, True])
def test_zero_weight_is_exactly_the_base_loss_and_no_gradient_to_s(base, scale):
    x, s, labels = _batch()
    packed = torch.cat([x, s], 1).requires_grad_(True)
    wrapped = NAMRLoss(base, D, structure_weight=0.0, scale_by_mean_distance=scale)(packed, labels)
    x_in = x / F_namr.mean_pairwise_distance(x) if scale else x
    assert torch.equal(wrapped, base(x_in, labels))
    wrapped.backward()
    assert torch.count_nonzero(packed.grad[:, D:]) == 0
    assert torch.count_nonzero(packed.grad[:, :D]) > 0


@pytest.mark.parametrize("base", _base_losses(), ids=lambda l: type(l).__name__)
def test_positive_weight_adds_the_structure_term(base):
    x, s, labels = _batch(seed=1)
    packed = torch.cat([x, s], 1).requires_grad_(True)
    namr = NAMRLoss(base, D, structure_weight=2.0)
    total = namr(packed, labels)
    x_t = x / F_namr.mean_pairwise_distance(x)
    # "auto" geometry: the structure term sees L2-normalised x when the base loss normalises its embeddings
    normalised = getattr(base.distance, "normalize_embeddings", False)
    assert namr.structure_geometry == ("l2" if normalised else "scaled")
    x_s = x_t / x_t.norm(dim=1, keepdim=True) if normalised else x_t
    expected = base(x_t, labels) + 2.0 * MultiClusterRankingLoss(D)(torch.cat([x_s, s], 1))
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=1e-14)
    total.backward()
    assert torch.count_nonzero(packed.grad[:, D:]) > 0
    assert namr.metric_loss_value == pytest.approx(float(base(x_t, labels)), rel=1e-12)
    assert namr.structure_loss_value > 0
    for name in ["metric_loss_value", "structure_loss_value", "structure_weight", "embedding_size"]:
        assert name in namr._record_these


def test_scaling_is_not_detached():
    # gradient through d_bar: a pure rescaling of x leaves the scaled loss unchanged, so the gradient is
    # orthogonal to x (it would not be if d_bar were detached)
    x, s, labels = _batch(seed=2)
    packed = torch.cat([x, s], 1).requires_grad_(True)
    NAMRLoss(losses.ContrastiveLoss(distance=distances.LpDistance(normalize_embeddings=False)), D)(
        packed, labels
    ).backward()
    radial = (packed.grad[:, :D] * x).sum()
    assert abs(radial.item()) < 1e-10
    assert packed.grad[:, :D].abs().max() > 1e-3


class _SpyMiner(miners.BaseMiner):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.seen = []

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        self.seen.append(embeddings.detach().clone())
        return self.inner.mine(embeddings, labels, ref_emb, ref_labels)


def test_miner_runs_on_scaled_sample_embedding_only():
    x, s, labels = _batch(seed=3)
    spy = _SpyMiner(miners.TripletMarginMiner(margin=0.3, type_of_triplets="all"))
    base = losses.TripletMarginLoss(margin=0.3)
    namr = NAMRLoss(base, D, miner=spy, structure_weight=0.0)
    out = namr(torch.cat([x, s], 1), labels)
    x_t = x / F_namr.mean_pairwise_distance(x)
    assert len(spy.seen) == 1 and spy.seen[0].shape == (16, D)
    torch.testing.assert_close(spy.seen[0], x_t, rtol=0, atol=0)
    triplets = miners.TripletMarginMiner(margin=0.3, type_of_triplets="all")(x_t, labels)
    assert torch.equal(out, base(x_t, labels, triplets))


def test_indices_tuple_and_ref_emb_are_passed_through():
    x, s, labels = _batch(seed=4)
    rx, rs, rlabels = _batch(n=8, seed=5)
    base = losses.ContrastiveLoss(distance=distances.LpDistance(normalize_embeddings=False))
    namr = NAMRLoss(base, D, structure_weight=0.0)
    scale = F_namr.mean_pairwise_distance(x)
    packed, packed_ref = torch.cat([x, s], 1), torch.cat([rx, rs], 1)
    # ref_emb and ref_labels, no indices: divided by the batch's d_bar and handed to the base loss
    torch.testing.assert_close(
        namr(packed, labels, None, packed_ref, rlabels),
        base(x / scale, labels, None, rx / scale, rlabels),
        rtol=0,
        atol=0,
    )
    # a sample-only ref_emb (width d) is accepted as well
    torch.testing.assert_close(
        namr(packed, labels, None, rx, rlabels), base(x / scale, labels, None, rx / scale, rlabels), rtol=0, atol=0
    )
    # an explicit indices_tuple is used as given
    pairs = miners.BatchEasyHardMiner()(x / scale, labels, rx / scale, rlabels)
    got = namr(packed, labels, pairs, packed_ref, rlabels)
    torch.testing.assert_close(got, base(x / scale, labels, pairs, rx / scale, rlabels), rtol=0, atol=0)
    assert not torch.equal(got, base(x / scale, labels, None, rx / scale, rlabels))


def test_width_and_argument_errors():
    x, s, labels = _batch()
    namr = NAMRLoss(losses.ContrastiveLoss(), D)
    with pytest.raises(ValueError, match="width 2 \\* embedding_size = 12"):
        namr(x, labels)
    with pytest.raises(ValueError, match="ref_emb must have width"):
        namr(torch.cat([x, s], 1), labels, None, torch.randn(4, 5, dtype=torch.float64), torch.arange(4))
    bad = torch.cat([x, s], 1)
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        NAMRLoss(losses.ContrastiveLoss(), D, structure_weight=0.0)(bad, labels)
    with pytest.raises(ValueError, match="labels must have shape"):
        namr(torch.cat([x, s], 1), labels[:-1])
    with pytest.raises(ValueError, match="structure_weight"):
        NAMRLoss(losses.ContrastiveLoss(), D, structure_weight=-1.0)
    with pytest.raises(ValueError, match="embedding_size"):
        NAMRLoss(losses.ContrastiveLoss(), D, structure_loss=MultiClusterRankingLoss(D + 1))


@pytest.mark.parametrize(
    "name",
    [
        "triplet",
        "TripletMarginLoss",
        "NAMR + Triplet",
        "multi-similarity",
        "MultiSimilarityLoss",
        "contrastive",
        "RankedListLoss",
        "rll",
    ],
)
def test_variants_constructible_by_name(name):
    torch.manual_seed(0)
    namr = make_namr_loss(name, D)
    assert isinstance(namr, NAMRLoss)
    x, s, labels = _batch(n=32, seed=6, dtype=torch.float32)
    packed = torch.cat([x, s], 1).requires_grad_(True)
    value = namr(packed, labels)
    assert torch.isfinite(value) and value > 0
    value.backward()
    assert torch.isfinite(packed.grad).all()


def test_triplet_variant_is_the_nasa_recipe():
    namr = make_namr_loss("triplet", D)
    assert isinstance(namr.loss, losses.TripletMarginLoss) and namr.loss.margin == 0.2
    assert namr.loss.distance.normalize_embeddings is False
    assert isinstance(namr.loss.reducer, reducers.MeanReducer)
    assert isinstance(namr.miner, miners.DistanceWeightedMiner)
    assert namr.structure_weight == 2.0 and namr.scale_by_mean_distance
    assert set(NAMR_VARIANTS) == {"triplet", "multi-similarity", "contrastive", "rll"}
    with pytest.raises(ValueError, match="unknown NAMR base loss"):
        make_namr_loss("arcface", D)


def test_sample_embedding_miner_equals_inner_miner_on_x():
    x, s, labels = _batch(seed=7)
    packed = torch.cat([x, s], 1)
    inner = miners.MultiSimilarityMiner(epsilon=0.1)
    got = SampleEmbeddingMiner(inner, D)(packed, labels)
    want = miners.MultiSimilarityMiner(epsilon=0.1)(x, labels)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    got_scaled = SampleEmbeddingMiner(miners.TripletMarginMiner(0.2), D, scale_by_mean_distance=True)(packed, labels)
    want_scaled = miners.TripletMarginMiner(0.2)(x / F_namr.mean_pairwise_distance(x), labels)
    assert all(torch.equal(a, b) for a, b in zip(got_scaled, want_scaled))
    # with a reference set (packed or sample-only)
    rx, rs, rl = _batch(n=8, seed=8)
    got_ref = SampleEmbeddingMiner(miners.BatchHardMiner(), D)(packed, labels, torch.cat([rx, rs], 1), rl)
    want_ref = miners.BatchHardMiner()(x, labels, rx, rl)
    assert all(torch.equal(a, b) for a, b in zip(got_ref, want_ref))
    with pytest.raises(ValueError, match="width 2 \\* embedding_size"):
        SampleEmbeddingMiner(inner, D)(x, labels)


def test_sample_embedding_miner_in_trainer_style_pipeline():
    # trainer: indices from mining_funcs, then loss_funcs["metric_loss"](packed, labels, indices)
    x, s, labels = _batch(seed=9)
    packed = torch.cat([x, s], 1)
    miner = SampleEmbeddingMiner(miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard"), D, True)
    namr = NAMRLoss(losses.TripletMarginLoss(margin=0.2), D, structure_weight=0.0)
    triplets = miner(packed, labels)
    x_t = x / F_namr.mean_pairwise_distance(x)
    assert torch.equal(namr(packed, labels, triplets), losses.TripletMarginLoss(margin=0.2)(x_t, labels, triplets))


def test_wraps_ranked_list_loss_with_indices_tuple_and_ref_emb():
    x, s, labels = _batch(seed=10)
    rx, rs, rlabels = _batch(n=12, seed=11)
    base = RankedListLoss(margin=0.4, Tn=10.0)
    namr = NAMRLoss(base, D, structure_weight=0.0)
    packed, packed_ref = torch.cat([x, s], 1), torch.cat([rx, rs], 1)
    scale = F_namr.mean_pairwise_distance(x)
    assert torch.equal(namr(packed, labels), base(x / scale, labels))
    got = namr(packed, labels, None, packed_ref, rlabels)
    assert torch.equal(got, base(x / scale, labels, None, rx / scale, rlabels))
    pairs = miners.BatchEasyHardMiner()(x / scale, labels)
    assert torch.equal(namr(packed, labels, pairs), base(x / scale, labels, pairs))
    # with the structure term
    packed.requires_grad_(True)
    full = NAMRLoss(base, D)(packed, labels)  # RankedListLoss normalises: the structure term sees unit x
    x_t = x / F_namr.mean_pairwise_distance(x)
    x_s = x_t / x_t.norm(dim=1, keepdim=True)
    expected = base(x_t, labels) + 2.0 * MultiClusterRankingLoss(D)(torch.cat([x_s, s], 1))
    torch.testing.assert_close(full, expected, rtol=1e-12, atol=1e-14)
    full.backward()
    assert torch.count_nonzero(packed.grad[:, D:]) > 0


def test_structure_geometry_choices():
    x, s, labels = _batch(seed=4)
    packed = torch.cat([x, s], 1)
    base = losses.ContrastiveLoss()  # normalises: "auto" -> "l2"
    scaled = NAMRLoss(base, D, structure_geometry="scaled")(packed, labels)
    l2 = NAMRLoss(base, D, structure_geometry="l2")(packed, labels)
    auto = NAMRLoss(base, D)(packed, labels)
    assert torch.equal(auto, l2) and not torch.allclose(scaled, l2)
    with pytest.raises(ValueError, match="structure_geometry"):
        NAMRLoss(base, D, structure_geometry="cosine")
