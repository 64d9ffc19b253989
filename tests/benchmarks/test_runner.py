"""End-to-end tests of the benchmark runner (`python -m benchmarks.run`) on tiny budgets."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from benchmarks.losses.registry import REGISTRY, default_loss_names
from benchmarks.results import report
from benchmarks.results.metrics import METRICS
from benchmarks.results.store import ResultStore
from benchmarks.run import main

OMNIGLOT = os.environ.get("PML_RLL_OMNIGLOT") or None  # a folder holding the Omniglot archives
TINY = ["--epochs", "2", "--iterations-per-epoch", "4", "--eval-every", "1"]


def _records(out):
    return report.load_jsonl(os.path.join(out, "results.jsonl"))


def test_digits_tiny_run_writes_every_output_and_resumes(tmp_path, capsys):
    out = str(tmp_path / "digits")
    losses = "rll,pml-rll,triplet"
    assert main(["--losses", losses, "--seeds", "2", "--out", out] + TINY) == 0
    recs = _records(out)
    assert sorted((r["loss"], r["seed"]) for r in recs) == sorted((n, s) for n in losses.split(",") for s in (0, 1))
    for r in recs:
        assert r["dataset"] == "digits" and r["iterations"] == 8
        assert set(r["metrics"]) >= set(METRICS)
        assert [p["epoch"] for p in r["curve"]] == [0, 1, 2]
        assert (
            r["environment"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
            and r["environment"]["torch"] == torch.__version__
        )
        assert r["seconds_per_iteration"] > 0 and r["wall_seconds"] > 0
        assert os.path.isfile(os.path.join(r["log_dir"], "logs", "logs.db"))  # record-keeper's per-run log
    # paired seeds: the untrained network is the same for every loss at a seed, and differs between seeds
    for s in (0, 1):
        untrained = {r["untrained"]["mean_average_precision_at_r"] for r in recs if r["seed"] == s}
        assert len(untrained) == 1
    md = open(os.path.join(out, "results.md")).read()
    assert "Paired difference in MAP@R" in md and "| rll |" in md
    csv_text = open(os.path.join(out, "results.csv")).read()
    assert "paired,rll,pml-rll,mean_average_precision_at_r" in csv_text
    assert os.path.getsize(os.path.join(out, "results.png")) > 10_000
    capsys.readouterr()

    # a second run skips everything; deleting one run from the store re-runs exactly that run
    assert main(["--losses", losses, "--seeds", "2", "--out", out] + TINY) == 0
    assert "0 runs/trials made, 6 reused from the store" in capsys.readouterr().out
    store = ResultStore("sqlite:///" + os.path.join(out, "results.db"))
    key = next(r["key"] for r in recs if r["loss"] == "triplet" and r["seed"] == 1)
    with store.engine.begin() as conn:
        conn.execute(store_table().delete().where(store_table().c.key == key, store_table().c.seed == 1))
    store.close()
    assert main(["--losses", losses, "--seeds", "2", "--out", out] + TINY) == 0
    assert "1 runs/trials made, 5 reused from the store" in capsys.readouterr().out
    recs2 = _records(out)
    assert len(recs2) == 6
    old = {(r["loss"], r["seed"]): r["metrics"] for r in recs}
    new = {(r["loss"], r["seed"]): r["metrics"] for r in recs2}
    assert new == old  # the re-run reproduces its numbers exactly (deterministic, paired)
    # a changed budget is a different configuration: nothing is reused
    assert (
        main(["--losses", "pml-rll", "--seeds", "1", "--out", out, "--epochs", "1", "--iterations-per-epoch", "3"]) == 0
    )
    assert "1 runs/trials made, 0 reused" in capsys.readouterr().out
    # so is a changed hyper-parameter
    assert main(["--losses", "triplet", "--seeds", "1", "--out", out, "--set", "triplet.margin=0.3"] + TINY) == 0
    assert "1 runs/trials made, 0 reused" in capsys.readouterr().out


def store_table():
    from benchmarks.results.store import RUNS

    return RUNS


@pytest.mark.skipif(OMNIGLOT is None, reason="Omniglot archives not found (set PML_RLL_OMNIGLOT)")
def test_omniglot_archives_tiny_run(tmp_path):
    from benchmarks.data.load import load_dataset

    bundle = load_dataset("omniglot", OMNIGLOT, image_size=14)
    assert bundle.info["train_alphabets"] and bundle.info["test_alphabets"]
    assert not set(bundle.info["train_alphabets"]) & set(bundle.info["test_alphabets"])
    n_classes = bundle.num_train_classes + len(np.unique(bundle.test.labels))
    assert n_classes == 242 and len(bundle.train) + len(bundle.test) == 4840  # Greek/Latin read once
    assert bundle.train[0][0].shape == (1, 14, 14)

    out = str(tmp_path / "omniglot")
    args = [
        "--dataset",
        "omniglot",
        "--data-root",
        OMNIGLOT,
        "--image-size",
        "14",
        "--losses",
        "rll,contrastive",
        "--seeds",
        "1",
        "--batch-size",
        "32",
        "--epochs",
        "1",
        "--iterations-per-epoch",
        "3",
        "--eval-every",
        "0",
        "--out",
        out,
    ]
    assert main(args) == 0
    recs = _records(out)
    assert sorted(r["loss"] for r in recs) == ["contrastive", "rll"]
    for r in recs:
        assert 0.0 <= r["metrics"]["mean_average_precision_at_r"] <= 1.0 and r["iterations"] == 3
        assert r["untrained"] == {} and len(r["curve"]) == 1
    assert "alphabet split" in open(os.path.join(out, "results.md")).read()


def test_trained_beats_untrained_for_our_losses(tmp_path):
    ours = [n for n in default_loss_names() if REGISTRY[n].family == "ours"]
    assert {"rll", "rll-autograd"} <= set(ours)
    out = str(tmp_path / "learn")
    assert (
        main(
            [
                "--losses",
                ",".join(ours),
                "--seeds",
                "1",
                "--epochs",
                "5",
                "--iterations-per-epoch",
                "10",
                "--eval-every",
                "5",
                "--out",
                out,
            ]
        )
        == 0
    )
    recs = _records(out)
    assert sorted(r["loss"] for r in recs) == sorted(ours)
    for r in recs:
        before = r["untrained"]["mean_average_precision_at_r"]
        after = r["metrics"]["mean_average_precision_at_r"]
        assert after > before + 0.3, (r["loss"], before, after)
        if r["loss"].startswith("namr-"):
            assert "plain_mean_average_precision_at_r" in r["metrics"]


def test_registry_entries_build_with_paper_defaults():
    from benchmarks.losses.registry import EXCLUDED, BuildContext, default

    assert "lifted-structure" in EXCLUDED and "lifted-structure" not in REGISTRY
    names = default_loss_names()
    assert {
        "rll",
        "rll-autograd",
        "pml-rll",
        "triplet",
        "multi-similarity",
        "contrastive",
        "circle",
        "ntxent",
        "generalized-lifted",
        "margin",
        "proxy-anchor",
    } <= set(names)
    assert {"namr-triplet", "namr-multi-similarity", "namr-contrastive", "namr-rll"} <= set(names)
    ctx = BuildContext(num_classes=7, embedding_size=16)
    for n in names:
        e = REGISTRY[n]
        assert e.params and e.source and e.search_space()  # every built-in loss can be tuned
        spec = e.build(ctx)
        assert isinstance(spec.loss, torch.nn.Module)
    assert REGISTRY["proxy-anchor"].build(ctx).loss.proxies.shape == (7, 16)
    assert REGISTRY["proxy-anchor"].build(ctx).loss_lr_multiplier == 100.0
    rll = REGISTRY["rll"].build(ctx).loss
    assert (rll.margin, rll.Tn) == (default("rll", "margin"), default("rll", "Tn")) == (0.4, 10.0)
    # the triplet miner's margin follows the loss's margin through a placeholder
    spec = REGISTRY["triplet"].build(ctx, {"margin": 0.35})
    assert spec.loss.margin == spec.miner.margin == 0.35
    # NAMR wraps the base entry with its own copy of the base's hyper-parameters
    namr = REGISTRY["namr-triplet"].build(ctx, {"loss.margin": 0.3, "structure_weight": 1.5})
    assert namr.namr and namr.loss.loss.margin == 0.3 and namr.loss.miner.margin == 0.3
    assert namr.loss.structure_weight == 1.5
    with pytest.raises(ValueError, match="unknown hyper-parameter 'Tnn'"):
        REGISTRY["rll"].build(ctx, {"Tnn": 3})


def test_paired_differences_are_per_seed():
    def rec(loss, fam, seed, v):
        return {
            "loss": loss,
            "family": fam,
            "seed": seed,
            "metrics": {"mean_average_precision_at_r": v, "precision_at_1": v},
            "seconds_per_iteration": 0.01,
            "untrained": {},
        }

    recs = [
        rec("a", "ours", 0, 0.50),
        rec("a", "ours", 1, 0.70),
        rec("a", "ours", 2, 0.9),
        rec("b", "pml", 0, 0.40),
        rec("b", "pml", 1, 0.65),
    ]  # b lacks seed 2: only shared seeds count
    (mean, std, n) = report.paired_differences(recs, "mean_average_precision_at_r")[("a", "b")]
    assert n == 2 and mean == pytest.approx(0.075) and std == pytest.approx(np.std([0.10, 0.05], ddof=1))
    md = report.markdown_tables(recs)
    assert "+7.50 ± 3.54" in md


def test_jsonl_export_is_whole_lines(tmp_path):
    path = str(tmp_path / "r.jsonl")
    report.write_jsonl(path, [{"i": i, "x": np.float64(0.5)} for i in range(3)])
    assert [r["i"] for r in report.load_jsonl(path)] == [0, 1, 2]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
