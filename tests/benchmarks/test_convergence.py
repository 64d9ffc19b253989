"""benchmarks/convergence.py: where validation learning curves flatten, on hand-made curves and on the runner's."""

from __future__ import annotations

import math

import pytest

from benchmarks.results import convergence
from benchmarks.results.convergence import analyse, flattens_at, window_range
from benchmarks.run import main

ITS = list(range(0, 2001, 200))
# rises, then stays within 0.2 points from 1000 on (values in %)
FLAT = [5.0, 30.0, 38.0, 42.0, 44.0, 45.0, 45.2, 45.3, 45.2, 45.4, 45.3]
RISING = [5.0, 30.0, 38.0, 42.0, 44.0, 45.0, 45.6, 46.2, 46.8, 47.4, 48.0]


def test_window_range_by_hand():
    v = [x / 100 for x in FLAT]
    # budget 1000: the last quarter is [750, 1000]: iterations 800 (44.0) and 1000 (45.0) -> 1.0 point
    assert window_range(ITS, v, 1000) == pytest.approx(0.010)
    # budget 1200: [900, 1200]: 1000 (45.0), 1200 (45.2) -> 0.2 point
    assert window_range(ITS, v, 1200) == pytest.approx(0.002)
    # budget 2000: [1500, 2000]: 45.2, 45.4, 45.3 -> 0.2
    assert window_range(ITS, v, 2000) == pytest.approx(0.002)
    assert math.isnan(window_range(ITS, v, 400))  # [300, 400] holds one evaluation only


def test_flattens_at_by_hand():
    v = [x / 100 for x in FLAT]
    # flat (<= 0.3 points) at 1200, 1400 ([1050, 1400]: 45.2, 45.3), 1600, 1800, 2000; not at 1000
    assert flattens_at(ITS, v, 0.003) == 1200
    assert flattens_at(ITS, v, 0.0015) is None  # 0.2-point windows at the end: not within 0.15
    assert flattens_at(ITS, v, 0.011) == 1000  # [750, 1000] spans 1.0 point
    assert flattens_at(ITS, [x / 100 for x in RISING], 0.003) is None  # +0.6 per evaluation to the end
    # a dip after a flat stretch restarts the count: flat from 1200 to 1600, then a 0.5-point rise at 1800
    bumpy = FLAT[:9] + [45.7, 45.8]
    assert flattens_at(ITS, [x / 100 for x in bumpy], 0.003) is None
    assert flattens_at(ITS[::-1], [x / 100 for x in FLAT][::-1], 0.003) == 1200  # order does not matter
    with pytest.raises(ValueError, match="tolerance"):
        flattens_at(ITS, v, -1.0)
    with pytest.raises(ValueError, match="length"):
        flattens_at(ITS, v[:-1], 0.003)


def _fold(loss, seed, fold, values, hparams=None):
    return {
        "loss": loss,
        "seed": seed,
        "fold": fold,
        "hparams": hparams if hparams is not None else {"x": 1},
        "iterations": ITS[-1],
        "curve": [
            {"iteration": i, "epoch": k, "mean_average_precision_at_r": v / 100}
            for k, (i, v) in enumerate(zip(ITS, values))
        ],
    }


def test_analyse_averages_folds_and_seeds():
    # two folds whose mean is FLAT: FLAT +- 1 point at every evaluation
    recs = [_fold("a", 0, 0, [x + 1 for x in FLAT]), _fold("a", 0, 1, [x - 1 for x in FLAT])]
    recs += [_fold("b", 0, 0, RISING), _fold("b", 0, 1, RISING, hparams={"x": 2})]
    recs.append({"loss": "c", "curve": [{"iteration": 100, "mean_average_precision_at_r": 0.1}]})  # one point
    res = analyse(recs, tolerance=0.003)
    by = {(c.loss, c.runs): c for c in res}
    a = by[("a", 2)]
    assert a.flattens_at == 1200 and a.values[-1] == pytest.approx(0.453) and a.flat_at_end(0.003)
    assert [c.loss for c in res].count("b") == 2  # two configurations of b, reported apart
    assert all(c.flattens_at is None and not c.flat_at_end(0.003) for c in res if c.loss == "b")
    assert convergence.verdict_budget([a]) == 1200 and convergence.verdict_budget(res) is None
    text = convergence.report(res, 0.003)
    assert "| a | " in text and "| 2 | 2000 | 45.30 | 0.20 | yes | 1200 |" in text
    assert "measure a longer budget" in text
    assert analyse(recs, losses=["a"])[0].loss == "a" and len(analyse(recs, losses=["a"])) == 1


def test_runner_curves_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "c")
    args = ["--losses", "rll,contrastive", "--tune", "--trials", "1", "--folds", "2", "--seeds", "1"]
    args += ["--epochs", "4", "--iterations-per-epoch", "3", "--eval-every", "1", "--batch-size", "32", "--out", out]
    assert main(args) == 0
    capsys.readouterr()
    assert convergence.main([out, "--tolerance", "100", "--curves"]) == 0
    text = capsys.readouterr().out
    # defaults (trial 0) on 2 folds, evaluated before training and after each of 4 epochs (2 in [9, 12])
    assert "| rll | defaults | 2 | 12 |" in text and "| contrastive | defaults | 2 | 12 |" in text
    assert "flattened by" in text and "rll (defaults): 0: " in text
    assert convergence.main([out, "--losses", "nothing"]) == 1
    assert convergence.main([out, "--timing", "--study-losses", "2", "--trials", "1", "--seeds", "1"]) == 0
    text = capsys.readouterr().out
    assert "| rll | 3 | 12 |" in text and "A study of 2 losses x 1 trials x 2 folds" in text  # 2 folds + 1 test run
    with pytest.raises(SystemExit):
        convergence.main([str(tmp_path / "none")])


def test_timing_and_study_estimate_by_hand():
    recs = [
        {"loss": "a", "iterations": 1000, "train_seconds": 90.0, "eval_seconds": 8.0, "wall_seconds": 100.0},
        {"loss": "a", "iterations": 1000, "train_seconds": 110.0, "eval_seconds": 12.0, "wall_seconds": 124.0},
        {"loss": "trial without clocks", "value": 0.5},
    ]
    text = convergence.timing(recs)
    # means: training 100 s (100 ms per iteration), evaluation 10 s, wall 112 s, other 2 s; (112 - 100) / 112
    assert "| a | 2 | 1000 | 100.0 | 100.0 | 10.0 | 2.0 | 112.0 | 10.7% |" in text
    assert "trial without clocks" not in text
    est = convergence.study_estimate(100.0, 18, 12, 2, 5, 2)
    # 18 x 12 x 2 = 432 fold runs, 18 x 2 x 5 = 180 test runs; 612 x 100 s / 2 jobs = 30,600 s = 8.5 h
    assert est == {"fold_runs": 432, "test_runs": 180, "hours": pytest.approx(8.5)}
    with pytest.raises(ValueError, match="jobs"):
        convergence.study_estimate(100.0, 18, 12, 2, 5, 0)
