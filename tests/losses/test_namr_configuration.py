"""NAMR ablation options of the losses: per-anchor centres, detached x, and the per-base configuration."""

from __future__ import annotations

import warnings

import pytest
import torch

from pml_rll.losses import MultiClusterRankingLoss, NAMRLoss, make_namr_loss
from pml_rll.losses.namr_loss import (
    DEPRECATED_NAMES,
    NAMR_CONFIGS,
    NAMR_VARIANTS,
    NASA_CONFIG,
    make_structure_loss,
    namr_config,
)
from pml_rll.retrieval import NAMRReRankKNN
from tests.reference import namr as ref

D = 3


def _packed(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    s = 0.5 + torch.rand(n, D, generator=g, dtype=torch.float64)
    return x, s


@pytest.mark.parametrize("k", [None, 3])
def test_per_anchor_module_matches_loop_reference(k):
    x, s = _packed(seed=1)
    loss_fn = MultiClusterRankingLoss(D, center_mode="per_anchor", neighbourhood_k=k, collect_stats=True)
    packed = torch.cat([x, s], 1).requires_grad_(True)
    got = loss_fn(packed)
    want = ref.per_anchor_multi_cluster_loss(x, s, (0.0, 3.0), 10.0, 0.2, k)
    torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)
    got.backward()
    assert torch.isfinite(packed.grad).all() and packed.grad.abs().sum() > 0
    assert 0.0 <= loss_fn.nearest_cluster_fraction <= 1.0


def test_per_anchor_differs_from_batch_centres():
    x, s = _packed(n=8, seed=2)
    x[:4] *= 0.2  # one dense and one sparse region: row statistics differ from the batch's
    packed = torch.cat([x, s], 1)
    batch = MultiClusterRankingLoss(D)(packed)
    anchor = MultiClusterRankingLoss(D, center_mode="per_anchor")(packed)
    assert not torch.isclose(batch, anchor)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"center_mode": "global"}, "center_mode"),
        ({"center_mode": "per_anchor", "neighbourhood_k": 1}, "neighbourhood_k"),
        ({"center_mode": "per_anchor", "neighbourhood_k": 2.5}, "neighbourhood_k"),  # a TypeError
        ({"neighbourhood_k": 4}, "per_anchor"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MultiClusterRankingLoss(D, **kwargs)


def test_detached_sample_embedding_sends_gradient_to_s_only():
    x, s = _packed(seed=3)
    packed = torch.cat([x, s], 1).requires_grad_(True)
    MultiClusterRankingLoss(D, detach_sample_embedding=True)(packed).backward()
    assert packed.grad[:, :D].abs().max() == 0
    assert packed.grad[:, D:].abs().sum() > 0
    joint = torch.cat([x, s], 1).requires_grad_(True)
    MultiClusterRankingLoss(D)(joint).backward()
    torch.testing.assert_close(joint.grad[:, D:], packed.grad[:, D:])  # same value, same gradient to s
    assert joint.grad[:, :D].abs().sum() > 0


def test_configs_cover_every_base_and_are_valid():
    assert set(NAMR_CONFIGS) == set(NAMR_VARIANTS)
    for name in NAMR_VARIANTS:
        cfg = namr_config(name)
        assert set(cfg) == set(NASA_CONFIG)
        assert isinstance(make_structure_loss(D, cfg), MultiClusterRankingLoss)
        assert cfg["structure_weight"] >= 0
        assert set(cfg["retrieval"]) == {"mode", "num_candidates", "weighting", "blend"}
        # plain retrieval by default; the knn it configures ranks exactly as plain Euclidean search
        knn = NAMRReRankKNN(D, **cfg["retrieval"])
        x, s = torch.randn(20, D, dtype=torch.float64), 0.5 + torch.rand(20, D, dtype=torch.float64)
        _, idx = knn(torch.cat([x, s], 1), 5, x, ref_includes_query=True)
        plain = torch.cdist(x, x).fill_diagonal_(float("inf")).topk(5, largest=False).indices
        assert cfg["retrieval"]["mode"] == "plain" and idx.tolist() == plain.tolist()


def test_namr_config_is_a_copy_and_make_namr_loss_uses_it(monkeypatch):
    cfg = namr_config("multi-similarity")
    cfg["retrieval"]["blend"] = -1.0
    cfg["structure_weight"] = 99.0
    assert NAMR_CONFIGS["multi-similarity"]["retrieval"]["blend"] != -1.0
    custom = dict(NASA_CONFIG, structure_weight=0.25, center_mode="per_anchor", alpha=4.0)
    monkeypatch.setitem(NAMR_CONFIGS, "contrastive", custom)
    loss = make_namr_loss("ContrastiveLoss", D)
    assert isinstance(loss, NAMRLoss) and loss.structure_weight == 0.25
    assert loss.structure_loss.center_mode == "per_anchor" and loss.structure_loss.alpha == 4.0
    override = make_namr_loss("contrastive", D, structure_weight=1.5)  # explicit arguments win
    assert override.structure_weight == 1.5


@pytest.mark.parametrize("old, new", sorted(DEPRECATED_NAMES.items()))
def test_names_of_0_2_still_work_with_a_deprecation_warning(old, new):
    assert new in NAMR_VARIANTS and old not in NAMR_CONFIGS  # one name per loss: the registry's
    with pytest.warns(DeprecationWarning, match=f"'{old}' is deprecated; use '{new}'") as caught:
        cfg = namr_config(old)
    assert caught[0].filename == __file__  # attributed to the caller, not to the library
    assert cfg == namr_config(new)
    with pytest.warns(DeprecationWarning, match=f"use '{new}'"):
        assert NAMR_CONFIGS[old] is NAMR_CONFIGS[new]  # indexing the dict by an old key, as in 0.2.0
    with pytest.warns(DeprecationWarning, match=f"use '{new}'"):
        loss = make_namr_loss(old, D)
    assert loss.structure_weight == make_namr_loss(new, D).structure_weight
    with pytest.raises(KeyError):
        NAMR_CONFIGS["arcface"]


def test_current_names_and_class_names_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in (*NAMR_VARIANTS, "MultiSimilarityLoss", "RankedListLoss", "NAMR + Triplet"):
            namr_config(name)
            make_namr_loss(name, D)
