"""--set, --config (a user's own loss, defined below) and --tune (never reading the test split)."""

from __future__ import annotations

import csv
import json
import os
import time

import pytest
from pytorch_metric_learning.losses import ContrastiveLoss

from benchmarks.data.bundle import DatasetBundle
from benchmarks.losses.config import build_registry, parse_value
from benchmarks.losses.registry import BuildContext
from benchmarks.results import report
from benchmarks.results.store import ResultStore
from benchmarks.run import main

TINY = ["--epochs", "1", "--iterations-per-epoch", "3", "--eval-every", "0", "--batch-size", "32"]
BUILT: list[ScaledContrastiveLoss] = []


class ScaledContrastiveLoss(ContrastiveLoss):
    """A user's loss for the tests: PML's contrastive loss times ``scale``; records every instance built."""

    def __init__(self, scale: float = 1.0, width: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scale, self.width = float(scale), width
        BUILT.append(self)

    def forward(self, *args, **kwargs):
        return self.scale * super().forward(*args, **kwargs)


CONFIG = """
[losses.scaled]
class = "tests.benchmarks.test_runner_tune:ScaledContrastiveLoss"
kwargs = { scale = 2.0, neg_margin = 0.8, width = "{embedding_size}" }
search = { neg_margin = [0.5, 1.5], scale = { low = 0.5, high = 4.0, log = true } }
source = "a test"

[losses.scaled-ms]
class = "tests.benchmarks.test_runner_tune:ScaledContrastiveLoss"
miner = "pytorch_metric_learning.miners:MultiSimilarityMiner"
miner_kwargs = { epsilon = 0.2 }

[losses.rll]
kwargs = { Tn = 4.0 }
search = { Tn = { choices = [2.0, 4.0, 8.0] } }
"""


def _config(tmp_path) -> str:
    path = tmp_path / "my.toml"
    path.write_text(CONFIG)
    return str(path)


def test_set_values_are_toml():
    assert parse_value("20") == 20 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value('"autograd"') == "autograd" and parse_value("autograd") == "autograd"
    assert parse_value("[0, 3]") == [0, 3]


def test_config_and_set_change_what_is_built(tmp_path):
    reg = build_registry(_config(tmp_path), ["scaled.scale=3", "rll.margin=0.3", "namr-triplet.loss.margin=0.25"])
    ctx = BuildContext(num_classes=5, embedding_size=16)
    spec = reg.entries["scaled"].build(ctx, reg.overrides.get("scaled"))
    assert isinstance(spec.loss, ScaledContrastiveLoss) and spec.miner is None
    assert (spec.loss.scale, spec.loss.neg_margin, spec.loss.width) == (3.0, 0.8, 16)  # placeholder resolved
    assert reg.entries["scaled"].family == "user" and reg.entries["scaled"].params["scale"].log
    spec = reg.entries["scaled-ms"].build(ctx)
    assert spec.miner.epsilon == 0.2
    rll = reg.entries["rll"].build(ctx, reg.overrides["rll"]).loss
    assert (rll.Tn, rll.margin) == (4.0, 0.3)  # --config changed the default, --set the margin
    assert reg.entries["rll"].params["Tn"].choices == (2.0, 4.0, 8.0)
    namr = reg.entries["namr-triplet"].build(ctx, reg.overrides["namr-triplet"]).loss
    assert namr.loss.margin == namr.miner.margin == 0.25


def test_users_loss_runs_head_to_head(tmp_path, capsys):
    BUILT.clear()
    out = str(tmp_path / "o")
    argv = ["--config", _config(tmp_path), "--losses", "scaled,contrastive", "--seeds", "2", "--out", out]
    assert main(argv + ["--set", "scaled.scale=0.5"] + TINY) == 0
    recs = report.load_jsonl(os.path.join(out, "results.jsonl"))
    assert sorted((r["loss"], r["seed"]) for r in recs) == [("contrastive", 0), ("contrastive", 1)] + [
        ("scaled", 0),
        ("scaled", 1),
    ]
    mine = [r for r in recs if r["loss"] == "scaled"]
    assert all(r["family"] == "user" and r["hparams"]["scale"] == 0.5 for r in mine)
    assert {b.scale for b in BUILT} == {0.5} and {b.width for b in BUILT} == {32}
    md = open(os.path.join(out, "results.md")).read()
    assert "| scaled | user |" in md and "| ours \\ PML | contrastive |" in md  # paired against PML's loss


def test_tune_two_trials_two_folds_never_reads_test(tmp_path, monkeypatch, capsys):
    reads: list[float] = []
    original = DatasetBundle.test

    def watched(self):
        value = original.fget(self)
        if self.name == "digits" and "fold" not in self.info:
            reads.append(time.time())
        return value

    monkeypatch.setattr(DatasetBundle, "test", property(watched))
    out = str(tmp_path / "tune")
    argv = ["--losses", "rll,contrastive", "--seeds", "1", "--tune", "--folds", "2", "--out", out] + TINY
    assert main(argv + ["--trials", "2"]) == 0
    store = ResultStore("sqlite:///" + os.path.join(out, "results.db"))
    trials = store.records(kind="trial")
    folds = store.records(kind="fold")
    store.close()
    assert sorted((t["loss"], t["slot"]) for t in trials) == [("contrastive", 0), ("contrastive", 1)] + [
        ("rll", 0),
        ("rll", 1),
    ]
    assert len(folds) == 8 and all(f["iterations"] == 3 for f in folds)
    assert all(t["value"] is not None and len(t["fold_values"]) == 2 for t in trials)
    # trial 0 is the defaults; trial 1 is drawn from the search space
    t0 = {t["loss"]: t for t in trials if t["slot"] == 0}
    assert t0["rll"]["params"] == {"margin": 0.4, "Tn": 10.0, "imbalance": 0.5, "Tp": 0.0, "gradient": "paper"}
    # the test split was read only after the last trial had finished (the split's label hash excepted, read once
    # before any training to key the results)
    last_trial = max(t["finished_unix"] for t in trials)
    assert len([t for t in reads if t < last_trial]) <= 1 and len(reads) > 1
    recs = report.load_jsonl(os.path.join(out, "results.jsonl"))
    assert sorted((r["loss"], r["variant"]) for r in recs) == [
        ("contrastive", "tuned"),
        ("contrastive", "untuned"),
        ("rll", "tuned"),
        ("rll", "untuned"),
    ]
    best = {t["loss"]: max((x for x in trials if x["loss"] == t["loss"]), key=lambda x: x["value"]) for t in trials}
    for r in recs:
        if r["variant"] == "tuned":
            assert all(r["hparams"][k] == v for k, v in best[r["loss"]]["params"].items())
    md = open(os.path.join(out, "results.md")).read()
    assert "## Tuning: 2 trials per loss, 2 class-disjoint folds" in md
    assert "Test split, tuned − untuned" in md and "## Test split, untuned (defaults)" in md
    rows = list(csv.reader(open(os.path.join(out, "trials.csv"))))
    assert len(rows) == 5
    capsys.readouterr()
    # an interrupted or extended --tune resumes: the finished trials are kept, one more is made
    assert main(argv + ["--trials", "3"]) == 0
    text = capsys.readouterr().out
    assert "trial 2: validation" in text and "trial 0: validation" not in text
    store = ResultStore("sqlite:///" + os.path.join(out, "results.db"))
    trials = store.records(kind="trial")
    assert len(trials) == 6 and len(store.records(kind="fold")) == 12
    store.close()
    for loss in ("rll", "contrastive"):  # the resumed study draws new points, not its first random draw again
        params = [json.dumps(t["params"], sort_keys=True) for t in trials if t["loss"] == loss]
        assert len(set(params)) == 3, params


def test_sealed_test_split_raises():
    from benchmarks.data.bundle import TestSplitSealedError
    from benchmarks.data.load import load_dataset

    bundle = load_dataset("digits")
    bundle.test_sealed = True
    with pytest.raises(TestSplitSealedError):
        _ = bundle.test


def test_example_config_builds():
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    reg = build_registry(os.path.join(repo, "benchmarks", "examples", "my_loss.toml"), [])
    ctx = BuildContext(num_classes=6, embedding_size=8)
    spec = reg.entries["my-loss"].build(ctx)
    assert spec.loss.centers.shape == (6, 8) and spec.loss_lr_multiplier == 10.0
    assert reg.entries["my-loss"].search_space().keys() == {"neg_margin", "center_weight"}
    assert reg.entries["ms-strict"].build(ctx).miner.epsilon == 0.05
    assert reg.entries["rll"].build(ctx).loss.Tn == 20.0
