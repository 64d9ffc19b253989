"""The verdict's registry entries: cross-batch memory with XBM's warm-up, RankedListLoss's gradient rule and Tp in
its search space, the NAMR entries' validated configurations; each trained in a tiny run."""

from __future__ import annotations

import os

import pytest
import torch
from pytorch_metric_learning.losses import ContrastiveLoss, MultiSimilarityLoss
from pytorch_metric_learning.miners import MultiSimilarityMiner

from benchmarks.losses.registry import MEMORY_BASES, NAMR_ENTRIES, REGISTRY, BuildContext, namr_base_config
from benchmarks.results import report
from benchmarks.run import main
from benchmarks.warmup_cross_batch_memory import WarmupCrossBatchMemory
from pml_rll.losses import CrossBatchMemory, RankedListLoss

CTX = BuildContext(num_classes=7, embedding_size=8)


def _batch(seed, n=12, d=8, classes=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    return x, torch.arange(n) % classes


def _grad(fn, x, y):
    x = x.clone().requires_grad_(True)
    v = fn(x, y)
    (g,) = torch.autograd.grad(v, x)
    return v.detach(), g


@pytest.mark.parametrize(
    "make", [lambda: (ContrastiveLoss(), None), lambda: (MultiSimilarityLoss(), MultiSimilarityMiner(0.1))]
)
def test_warmup_then_batch_plus_memory_against_references(make):
    loss, miner = make()
    xbm = WarmupCrossBatchMemory(loss, 8, memory_size=32, miner=miner, start_iteration=2)
    ref = CrossBatchMemory(loss, 8, memory_size=32, miner=miner)  # PML's memory, fed from the first memory call on

    def plain(x, y):
        return loss(x, y, miner(x, y) if miner is not None else None)

    for it in range(5):
        x, y = _batch(it)
        y = y + (it % 2)  # the labels move, so memory rows of earlier batches pair differently
        v, g = _grad(xbm, x, y)
        if it < 2:  # warm-up: exactly the loss without a memory; nothing enqueued
            v_ref, g_ref = _grad(plain, x, y)
            assert xbm.queue_idx == 0 and not xbm.has_been_filled
        else:  # the batch's loss plus the loss against the memory (PML's class fed the same batches)
            v_ref, g_ref = _grad(lambda e, t: plain(e, t) + ref(e, t), x, y)
        torch.testing.assert_close(v, v_ref)
        torch.testing.assert_close(g, g_ref)
        assert xbm.iteration == it + 1
    assert xbm.queue_idx == ref.queue_idx == (3 * 12) % 32 and xbm.has_been_filled
    torch.testing.assert_close(xbm.embedding_memory, ref.embedding_memory)


def test_memory_entry_adds_pairs_with_past_batches():
    # the memory term is not the batch term again: with earlier batches in the memory, the value differs
    loss = ContrastiveLoss(pos_margin=0.0, neg_margin=1.0)
    xbm = WarmupCrossBatchMemory(loss, 8, memory_size=64, start_iteration=0)
    x0, y0 = _batch(0)
    xbm(x0, y0)
    x1, y1 = _batch(1)
    only_batch = loss(x1, y1) + CrossBatchMemory(loss, 8, memory_size=64)(x1, y1)
    assert not torch.allclose(xbm(x1, y1), only_batch)


def test_rejected_calls_change_nothing():
    xbm = WarmupCrossBatchMemory(ContrastiveLoss(), 8, memory_size=16, start_iteration=1)
    x, y = _batch(0)
    xbm(x, y)  # warm-up
    xbm(x, y)  # first memory call
    state = (xbm.iteration, xbm.queue_idx, xbm.has_been_filled, xbm.embedding_memory.clone())
    for bad, match in (
        (lambda: xbm(x[:, :4], y), "width|embeddings"),
        (lambda: xbm(torch.randn(20, 8, dtype=torch.float64), torch.arange(20)), "memory_size"),
        (lambda: xbm(x, y, indices_tuple=(torch.tensor([0]), torch.tensor([1]))), "indices_tuple"),
        (lambda: xbm(x, y, enqueue_mask=torch.ones(12, dtype=torch.bool)), "enqueue_mask"),
        (lambda: xbm(x, y[:5]), "labels"),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            bad()
        assert (xbm.iteration, xbm.queue_idx, xbm.has_been_filled) == state[:3]
        torch.testing.assert_close(xbm.embedding_memory, state[3])
    with pytest.raises(ValueError, match="start_iteration"):
        WarmupCrossBatchMemory(ContrastiveLoss(), 8, start_iteration=-1)
    with pytest.raises(TypeError, match="start_iteration"):
        WarmupCrossBatchMemory(ContrastiveLoss(), 8, start_iteration=1.5)


def test_rll_search_space_has_gradient_and_tp():
    for name in ("rll", "rll-xbm", "namr-rll"):
        prefix = "" if name == "rll" else "loss."
        space = REGISTRY[name].search_space()
        assert space[prefix + "gradient"].choices == ("paper", "autograd")
        assert (space[prefix + "Tp"].low, space[prefix + "Tp"].high) == (0.0, 10.0)
        assert REGISTRY[name].params[prefix + "gradient"].default == "paper"
    assert REGISTRY["pml-rll"].search_space()["Tp"].high == 10.0 and "gradient" not in REGISTRY["pml-rll"].params
    assert "gradient" not in REGISTRY["rll-autograd"].search_space()  # the autograd rule alone
    loss = REGISTRY["rll"].build(CTX, {"gradient": "autograd", "Tp": 2.5}).loss
    assert isinstance(loss, RankedListLoss) and (loss.gradient, loss.Tp) == ("autograd", 2.5)


def test_memory_entries_build_their_base_inside_the_memory():
    assert set(MEMORY_BASES) == {"rll", "contrastive", "multi-similarity"}
    for base in MEMORY_BASES:
        e = REGISTRY[f"{base}-xbm"]
        assert e.memory and not e.namr and e.base == base and e.family == REGISTRY[base].family
        assert {"memory_size", "start_iteration"} <= set(e.search_space())
        assert {f"loss.{k}" for k in REGISTRY[base].search_space()} <= set(e.search_space())
        spec = e.build(CTX)
        assert isinstance(spec.loss, WarmupCrossBatchMemory) and spec.miner is None and not spec.namr
        assert (spec.loss.memory_size, spec.loss.start_iteration) == (1024, 1000)
    spec = REGISTRY["rll-xbm"].build(CTX, {"memory_size": 300, "start_iteration": 7, "loss.gradient": "autograd"})
    assert (spec.loss.memory_size, spec.loss.start_iteration, spec.loss.loss.gradient) == (300, 7, "autograd")
    ms = REGISTRY["multi-similarity-xbm"].build(CTX, {"loss.miner.epsilon": 0.3}).loss
    assert isinstance(ms.loss, MultiSimilarityLoss) and ms.miner.epsilon == 0.3  # the miner mines inside the memory
    # the memory's own checks reach the registry: a memory smaller than nothing is refused when built
    with pytest.raises((ValueError, TypeError), match="memory_size"):
        REGISTRY["contrastive-xbm"].build(CTX, {"memory_size": 0})


def test_namr_entries_carry_the_validated_configurations():
    from pml_rll.losses.namr_loss import namr_config

    assert set(NAMR_ENTRIES) == {"namr-triplet", "namr-multi-similarity", "namr-contrastive", "namr-rll"}
    for name in NAMR_ENTRIES:
        e = REGISTRY[name]
        cfg = namr_config(e.base)  # NAMR_CONFIGS, read now: the one place these values live
        assert namr_base_config(e.base) == cfg
        assert e.params["structure_weight"].default == cfg["structure_weight"]
        assert e.params["structure.center_mode"].default == cfg["center_mode"]
        for k, v in cfg["retrieval"].items():
            assert e.params[f"retrieval.{k}"].default == v
        spec = e.build(CTX)
        assert (
            spec.namr and spec.loss.structure_weight == cfg["structure_weight"] and spec.retrieval == cfg["retrieval"]
        )


TINY = ["--epochs", "2", "--iterations-per-epoch", "4", "--eval-every", "1", "--seeds", "1"]


def test_tiny_runs_of_every_verdict_entry(tmp_path):
    """Every memory entry (the memory starting at iteration 3 of 8), RLL with each gradient rule and Tp > 0, and
    every NAMR entry train and evaluate in the runner."""
    out = str(tmp_path / "v")
    names = [f"{b}-xbm" for b in MEMORY_BASES] + ["rll", "rll-autograd"] + list(NAMR_ENTRIES)
    sets = []
    for b in MEMORY_BASES:
        sets += ["--set", f"{b}-xbm.start_iteration=3", "--set", f"{b}-xbm.memory_size=256"]
    sets += ["--set", "rll.Tp=2.0", "--set", "rll-xbm.loss.gradient=autograd"]
    assert main(["--losses", ",".join(names), "--out", out, *TINY, *sets]) == 0
    recs = report.load_jsonl(os.path.join(out, "results.jsonl"))
    assert sorted(r["loss"] for r in recs) == sorted(names)
    for r in recs:
        m = r["metrics"]["mean_average_precision_at_r"]
        assert r["iterations"] == 8 and 0.0 < m <= 1.0 and len(r["curve"]) == 3, r["loss"]
    by = {r["loss"]: r for r in recs}
    assert by["rll-xbm"]["hparams"]["start_iteration"] == 3 and by["rll-xbm"]["hparams"]["loss.gradient"] == "autograd"
    assert by["rll"]["hparams"]["Tp"] == 2.0
    # the report's interval tables cover the new entries (one seed: no interval yet)
    md = open(os.path.join(out, "results.md")).read()
    assert "| rll-xbm | contrastive-xbm | 1 |" in md and "n/a" in md
    assert "| rll-xbm | rll | 1 |" in md  # variant vs its base


def test_tiny_tune_searches_the_gradient_rule(tmp_path):
    out = str(tmp_path / "t")
    args = ["--losses", "rll,rll-xbm", "--tune", "--trials", "5", "--folds", "2", "--out", out, "--batch-size", "32"]
    args += ["--epochs", "1", "--iterations-per-epoch", "3", "--eval-every", "0", "--seeds", "2"]
    args += ["--set", "rll-xbm.start_iteration=1"]
    assert main(args) == 0
    import csv
    import json

    with open(os.path.join(out, "trials.csv")) as f:
        trials = list(csv.DictReader(f))
    assert len(trials) == 10
    for t in trials:
        params = json.loads(t["params"])
        g = params["gradient" if t["loss"] == "rll" else "loss.gradient"]
        assert g in ("paper", "autograd") and 0.0 <= params["Tp" if t["loss"] == "rll" else "loss.Tp"] <= 10.0
        if t["loss"] == "rll-xbm":
            assert 256 <= params["memory_size"] <= 4096 and "start_iteration" in params
    assert {json.loads(t["params"])["gradient"] for t in trials if t["loss"] == "rll" and t["slot"] == "0"} == {"paper"}
    md = open(os.path.join(out, "results.md")).read()
    assert "### tuned − untuned, same loss\n" in md
