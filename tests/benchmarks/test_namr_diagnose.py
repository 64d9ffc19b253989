"""benchmarks/namr_diagnose.py parts and the NAMR registry entries' use of the per-base configuration."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from benchmarks import namr_diagnose as nd
from benchmarks.pipeline import build_accuracy_calculator
from benchmarks.registry import REGISTRY, BuildContext
from pml_rll.losses.namr_loss import NASA_CONFIG, namr_config


def _data(seed=0, n_classes=6, per_class=5, d=4):
    rng = np.random.RandomState(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    x = rng.randn(len(labels), d) + 1.2 * rng.randn(n_classes, d)[labels]
    s = 0.5 + rng.rand(len(labels), d)
    return torch.tensor(np.concatenate([x, s], 1)), torch.tensor(labels)


def test_map_at_r_and_p1_match_pml_and_plain_equals_blend_zero():
    packed, labels = _data()
    out = nd.evaluate_embeddings(packed, labels, 4, normalize=False, seed=0)
    pml = AccuracyCalculator(include=("mean_average_precision_at_r", "precision_at_1"), k="max_bin_count")
    want = pml.get_accuracy(packed[:, :4], labels, ref_includes_query=True)
    assert out["plain"][0] == pytest.approx(want["mean_average_precision_at_r"], abs=1e-9)
    assert out["plain"][1] == pytest.approx(want["precision_at_1"], abs=1e-9)
    assert out["query_b1_k1"] == out["plain"]  # one candidate: nothing to re-rank
    assert 0.0 <= out["top1_fixed"] + out["top1_broken"] <= out["top1_changed"] <= 1.0
    assert set(out["s_stats"]) >= {"std_over_samples", "corr_s_vs_class_spread", "corr_mean_s_vs_knn10_distance"}


def test_rerank_top_reorders_only_the_head():
    plain = torch.tensor([[3, 1, 2, 0]])
    score = torch.tensor([[4.0, 9.0, 1.0, 2.0]])  # by score: 2, 3, 0, 1
    assert nd.rerank_top(plain, score, 2).tolist() == [[3, 1, 2, 0]]  # 3 (2.0) before 1 (9.0)
    assert nd.rerank_top(plain, score, 3).tolist() == [[2, 3, 1, 0]]
    assert nd.rerank_top(plain, score, None).tolist() == [[2, 3, 0, 1]]


def test_parse_variant():
    assert nd.parse_variant("base") is None
    assert nd.parse_variant("nasa") == NASA_CONFIG
    cfg = nd.parse_variant('structure_weight=0.5+center_mode="per_anchor"+t_values=(0,1.5,3)+blend=0.25')
    assert cfg["structure_weight"] == 0.5 and cfg["center_mode"] == "per_anchor"
    assert cfg["t_values"] == (0, 1.5, 3) and cfg["retrieval"]["blend"] == 0.25
    assert NASA_CONFIG["retrieval"]["blend"] == 1.0  # not modified
    assert nd.parse_variant("center_mode=per_anchor+neighbourhood_k=None")["center_mode"] == "per_anchor"
    with pytest.raises(SystemExit, match="unknown variant key"):
        nd.parse_variant("lambda=2")


@pytest.mark.parametrize("name", ["namr-triplet", "namr-multi-similarity", "namr-contrastive", "namr-rll"])
def test_registry_entries_use_the_validated_configuration(name):
    base = REGISTRY[name].base
    cfg = namr_config(base)
    torch.manual_seed(0)
    spec = REGISTRY[name].build(BuildContext(num_classes=10, embedding_size=8))
    assert spec.namr and spec.retrieval == cfg["retrieval"]
    assert spec.loss.structure_weight == cfg["structure_weight"]
    sl = spec.loss.structure_loss
    assert (sl.center_mode, sl.alpha, sl.detach_sample_embedding) == (
        cfg["center_mode"],
        cfg["alpha"],
        cfg["detach_sample_embedding"],
    )
    calc = build_accuracy_calculator(spec.loss, torch.device("cpu"), retrieval=spec.retrieval)
    assert calc.rerank_knn.normalize_sample == calc.plain_knn.normalize_sample == spec.loss.retrieval_normalize_sample
    assert calc.rerank_knn.weighting == cfg["retrieval"]["weighting"]
    assert calc.rerank_knn.blend == cfg["retrieval"]["blend"]
    assert calc.rerank_knn.num_candidates == cfg["retrieval"]["num_candidates"]


def _record(base, variant, seed, plain, **rerank):
    after = {"plain": [plain, 0.0], "query_b1_k1": [plain, 0.0]}
    after.update({k: [v, 0.0] for k, v in rerank.items()})
    return {"base": base, "variant": variant, "seed": seed, "after_training": after}


def test_choose_picks_retrieval_then_training_variant_and_prefers_query_weighting():
    records = [
        {"base": "triplet", "variant": "base", "seed": 0, "metrics": {"mean_average_precision_at_r": 0.2}},
        _record("triplet", "nasa", 0, 0.30, query_b1_k8=0.29, symmetric_b1_k8=0.2901),
        _record("triplet", "nasa", 1, 0.32, query_b1_k8=0.31, symmetric_b1_k8=0.3101),
        _record("triplet", "a", 0, 0.20, query_b1_k8=0.19, symmetric_b1_k8=0.1901),
        _record("triplet", "a", 1, 0.22, query_b1_k8=0.21, symmetric_b1_k8=0.2101),
        _record("triplet", "single", 0, 0.90, query_b1_k8=0.89, symmetric_b1_k8=0.8901),  # one seed: not eligible
    ]
    key, picks, lines = nd.choose(records)
    assert key == "query_b1_k8"  # symmetric gains 0.01 points < SYMMETRIC_MARGIN
    assert picks == {"triplet": "nasa"}
    assert "query_b1_k8" in lines[0]
