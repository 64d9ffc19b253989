"""benchmarks/namr_diagnose/diagnose.py parts and the NAMR registry entries' use of the per-base configuration."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from benchmarks.execute.pipeline import build_accuracy_calculator
from benchmarks.losses.registry import REGISTRY, BuildContext
from benchmarks.namr_diagnose import diagnose as nd
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
    # plain retrieval is the entries' default; re-ranking is computed beside it (reranked_* keys)
    assert cfg["retrieval"]["mode"] == "plain" and calc.main == "plain" and calc.rerank_knn.mode == "rerank"


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


def test_gradient_spread_hand_cases():
    same = torch.tensor([[1.0, -2.0], [1.0, -2.0], [1.0, -2.0]])
    out = nd.gradient_spread(same, "g")
    assert out["g_common_share"] == pytest.approx(1.0) and out["g_between_over_mean_sq"] == pytest.approx(0.0)
    opposite = torch.tensor([[1.0, 3.0], [-1.0, -3.0]])  # no common part at all
    assert nd.gradient_spread(opposite, "g")["g_common_share"] == pytest.approx(0.0)
    # rows (2, 0) and (0, 2): mean (1, 1), |mean|^2 = 2, N |mean|^2 / sum |g_i|^2 = 4 / 8; variance 1 per dimension
    out = nd.gradient_spread(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), "g")
    assert out["g_common_share"] == pytest.approx(0.5) and out["g_between_over_mean_sq"] == pytest.approx(1.0)


def test_parse_variant_from_the_validated_configuration():
    cfg = nd.parse_variant("validated+shortlist_weight=4+centre_structure=true", "multi-similarity")
    want = namr_config("multi-similarity")
    assert cfg["structure_weight"] == want["structure_weight"] and cfg["retrieval"] == want["retrieval"]
    assert cfg["shortlist_weight"] == 4 and cfg["centre_structure"] is True
    with pytest.raises(SystemExit, match="needs a base"):
        nd.parse_variant("validated")


def test_centred_variant_builds_centred_loss_and_retrieval():
    cfg = nd.parse_variant("validated+centre_structure=true+shortlist_weight=0.5", "triplet")
    from benchmarks.losses.registry import namr_spec

    spec = namr_spec(REGISTRY["triplet"], BuildContext(num_classes=10, embedding_size=8), cfg)
    sl = spec.loss.structure_loss
    assert sl.centre_structure and sl.shortlist_weight == 0.5 and spec.retrieval["centre_structure"] is True
    packed, labels = _data()
    centred = nd.evaluate_embeddings(packed, labels, 4, normalize=False, seed=0, centre=True)
    # centring the evaluation set's s by hand gives the same numbers
    s = packed[:, 4:] / packed[:, 4:].mean(0)
    by_hand = nd.evaluate_embeddings(torch.cat([packed[:, :4], s], 1), labels, 4, normalize=False, seed=0)
    assert centred["query_b1_k8"] == by_hand["query_b1_k8"] and centred["plain"] == by_hand["plain"]
    assert centred["s_stats"]["spread_ratio"] == pytest.approx(float(s.std(0).mean() / s.std(1).mean()), rel=1e-9)


def test_partner_decomposition_hand_cases_and_trace():
    n, d = 6, 3
    s = 0.5 + torch.rand(n, d, dtype=torch.float64)
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    # l_ij = s_i . c for every partner: the same gradient everywhere, all common
    out = nd.partner_decomposition(lambda s_: (s_ @ c)[:, None].expand(n, n), s, "g")
    assert out["g_common"] == pytest.approx(1.0) and out["g_per_sample"] == pytest.approx(0.0, abs=1e-12)
    # l_ij = s_i . a_i with zero-mean a_i: all per-sample, nothing from the partners
    a = torch.randn(n, d, dtype=torch.float64)
    a -= a.mean(0)
    out = nd.partner_decomposition(lambda s_: (s_ * a).sum(1)[:, None].expand(n, n), s, "g")
    assert out["g_per_sample"] == pytest.approx(1.0) and out["g_partner_noise"] == pytest.approx(0.0, abs=1e-12)
    # l_ij = s_i . b_j: depends on the partners only
    b = torch.randn(n, d, dtype=torch.float64)
    out = nd.partner_decomposition(lambda s_: s_ @ b.t(), s, "g")
    assert out["g_partner_noise"] > 0.1
    assert sum(out.values()) == pytest.approx(1.0)
    # the training-time trace records all of it for a NAMR loss
    cfg = nd.parse_variant("validated+shortlist_weight=0.5", "contrastive")
    from benchmarks.losses.registry import namr_spec

    spec = namr_spec(REGISTRY["contrastive"], BuildContext(num_classes=4, embedding_size=4), cfg)
    packed, labels = _data(n_classes=4, per_class=4)
    row = nd.trace_batch(spec.loss, packed.float(), labels)
    keys = ("s_grad_cluster_common", "s_grad_cluster_per_sample", "s_grad_cluster_partner_noise")
    assert sum(row[k] for k in keys) == pytest.approx(1.0, rel=1e-6)
    assert 0 < row["s_grad_cluster_near_norm_share"] < 1 and -1 <= row["s_grad_cluster_near_cosine"] <= 1
    # pair losses from the near pairs only: all of the gradient is near
    x = torch.randn(n, d, dtype=torch.float64)
    plain = torch.cdist(x, x).fill_diagonal_(float("inf"))
    near = torch.zeros(n, n).scatter_(1, plain.topk(2, largest=False).indices, 1.0).double()
    out = nd.near_far_split(lambda s_: (s_ @ c)[:, None] * near, s, x, "g", k=2)
    assert out["g_near_norm_share"] == pytest.approx(1.0) and out["g_near_cosine"] == pytest.approx(1.0)
    assert 0 < row["s_grad_shortlist_common_share"] <= 1 and 0 < row["s_grad_cluster_common_share"] <= 1


def test_namr_accuracy_calculator_reports_both_retrievals_and_the_default_under_bare_keys():
    packed, labels = _data()
    from benchmarks.results.metrics import NAMRAccuracyCalculator
    from pml_rll.retrieval import NAMRReRankKNN

    got = {}
    for main in ("plain", "rerank"):
        calc = NAMRAccuracyCalculator(
            4, NAMRReRankKNN(4, num_candidates=29), NAMRReRankKNN(4, mode="plain"), main=main, k="max_bin_count"
        )
        got[main] = calc.get_accuracy(packed, labels, ref_includes_query=True)
    want = nd.evaluate_embeddings(packed, labels, 4, normalize=False, seed=0)
    for main, out in got.items():
        key = "mean_average_precision_at_r"
        assert out[f"plain_{key}"] == pytest.approx(want["plain"][0], abs=1e-9)
        assert out[f"reranked_{key}"] == pytest.approx(want["query_b1_kall"][0], abs=1e-9)
        assert out[key] == out[f"{'plain' if main == 'plain' else 'reranked'}_{key}"]
    assert got["plain"]["reranked_mean_average_precision_at_r"] != got["plain"]["plain_mean_average_precision_at_r"]


def test_paired_interval_and_rerank_table():
    from benchmarks.results import report

    mean, std, lo, hi = report.paired_interval([1.0, 2.0, 3.0])
    assert (mean, std) == (2.0, 1.0)
    assert (lo, hi) == pytest.approx((2.0 - 4.302652729749464 / 3**0.5, 2.0 + 4.302652729749464 / 3**0.5))
    metrics = lambda p, r: {  # noqa: E731
        "plain_mean_average_precision_at_r": p,
        "reranked_mean_average_precision_at_r": r,
        "plain_precision_at_1": p,
        "reranked_precision_at_1": r,
    }
    records = [{"loss": "namr-x", "seed": s, "metrics": metrics(0.30, 0.30 + 0.01 * (s + 1))} for s in range(3)]
    table = report.rerank_table(records)
    assert "| namr-x | 3 | MAP@R | 30.00 | 32.00 | +2.00 ± 1.00 |" in table


def test_remedy_and_gradient_tables():
    recs = []
    for seed, (plain, rer) in enumerate(((0.30, 0.31), (0.20, 0.23))):
        rec = _record("triplet", "v", seed, plain, **{k: rer for k in nd.REMEDY_KEYS})
        rec["after_training"]["s_stats"] = {"spread_ratio": 0.1 * (seed + 1), "std_over_samples": 0, "std_over_dims": 1}
        rec["trace"] = [{"s_grad_cluster_common_share": 0.2 + 0.2 * seed, "s_grad_cluster_common": 0.5}]
        recs.append(rec)
    row = nd.remedy_table(recs)[-1]
    assert row.startswith("| triplet | v | 2 | 0.150 | 25.00 | +2.00 ± 1.41 |")
    assert nd.gradient_table(recs)[-1] == "| triplet | v | 2 | 0.500 |  |  | 0.300 |  |  |  |"


def test_main_runs_each_base_variant_and_seed_once_and_writes_the_summary(tmp_path, monkeypatch):
    # training replaced by a stand-in that builds the entry's loss: the command's loop, skips and outputs only
    import json
    import types

    import benchmarks.execute.pipeline

    built = []

    def fake_run_one(bundle, entry, hparams, seed, cfg, device, log_dir, after_training=None):
        spec = entry.build(BuildContext(num_classes=4, embedding_size=8), hparams)
        built.append((entry.name, type(spec.loss).__name__, seed, cfg.epochs))
        metrics = {"mean_average_precision_at_r": 0.5, "plain_mean_average_precision_at_r": 0.25}
        return {"seed": seed, "metrics": metrics}  # (the fields of a run_one record the command reads)

    bundle = types.SimpleNamespace(description="a stand-in bundle")
    monkeypatch.setattr(benchmarks.execute.pipeline, "run_one", fake_run_one)
    monkeypatch.setattr(nd, "load_validation_bundle", lambda root, val=None: bundle)
    monkeypatch.setattr(nd, "after_training_factory", lambda bundle, seed: None)
    monkeypatch.setattr(nd, "summarize", lambda records: f"{len(records)} records")
    out = tmp_path / "out"
    argv = ["--data-root", str(tmp_path), "--bases", "triplet,rll", "--variants", "base", "structure_weight=0.5"]
    argv += ["--seeds", "0,1", "--epochs", "1", "--out", str(out)]
    assert nd.main(argv) == 0
    assert sorted(built) == sorted(
        [(b, cls, s, 1) for b, cls in (("triplet", "TripletMarginLoss"), ("rll", "RankedListLoss")) for s in (0, 1)]
        + [(f"namr-{b}", "NAMRLoss", s, 1) for b in ("triplet", "rll") for s in (0, 1)]
    )
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 8 and {r["namr_config"] is None for r in records} == {True, False}
    assert all(r["namr_config"]["structure_weight"] == 0.5 for r in records if r["variant"] != "base")
    assert (out / "summary.md").read_text().endswith("8 records\n")
    built.clear()
    assert nd.main(argv) == 0 and built == []  # finished runs are skipped on a rerun
