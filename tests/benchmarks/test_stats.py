"""benchmarks/stats.py: paired t intervals over seeds and verdicts, checked against values computed by hand."""

from __future__ import annotations

import csv
import io
import math
import os

import pytest

from benchmarks.results import report, stats
from benchmarks.results.stats import Interval, t_interval


def rec(loss, family, seed, map_r, p1=None, variant="untuned"):
    return {
        "loss": loss,
        "family": family,
        "seed": seed,
        "variant": variant,
        "metrics": {"mean_average_precision_at_r": map_r, "precision_at_1": map_r if p1 is None else p1},
        "seconds_per_iteration": 0.01,
        "untrained": {},
    }


def test_t_interval_by_hand():
    # d = 1, 2, 3: mean 2, std 1, t(0.975, 2 dof) = 4.3027 (tables) -> half-width 4.3027 / sqrt(3) = 2.4841
    iv = t_interval([1.0, 2.0, 3.0])
    assert (iv.mean, iv.n) == (2.0, 3)
    assert iv.low == pytest.approx(2.0 - 2.48414, abs=1e-4) and iv.high == pytest.approx(2.0 + 2.48414, abs=1e-4)
    assert iv.verdict == "level"
    # d = 2, 3, 4, 5: mean 3.5, std sqrt(5/3) = 1.29099, t(0.975, 3) = 3.1824 -> half 3.1824 * 1.29099 / 2 = 2.0542
    iv = t_interval([2.0, 3.0, 4.0, 5.0])
    assert iv.low == pytest.approx(1.4458, abs=1e-3) and iv.high == pytest.approx(5.5542, abs=1e-3)
    assert iv.verdict == "better"
    assert t_interval([-2.0, -3.0, -4.0, -5.0]).verdict == "worse"
    # 90%: t(0.95, 3) = 2.3534 -> half 2.3534 * 1.29099 / 2 = 1.5191
    iv = t_interval([2.0, 3.0, 4.0, 5.0], confidence=0.90)
    assert iv.high - iv.mean == pytest.approx(1.5191, abs=1e-3)
    # five seeds, t(0.975, 4) = 2.7764: d = 0, 1, 2, 3, 4 -> std sqrt(2.5) = 1.5811, half = 2.7764 * 1.5811 / sqrt 5
    iv = t_interval([0.0, 1.0, 2.0, 3.0, 4.0])
    assert iv.high - iv.mean == pytest.approx(1.9632, abs=1e-3) and iv.verdict == "better"


def test_t_interval_edge_cases():
    assert t_interval([]).n == 0 and math.isnan(t_interval([]).mean) and t_interval([]).verdict == "n/a"
    one = t_interval([0.3, None, float("nan")])  # None and NaN are dropped
    assert (one.mean, one.n, one.verdict) == (0.3, 1, "n/a") and one.format() == "+30.00 (1 seed)"
    same = t_interval([0.01, 0.01, 0.01])  # zero spread: a zero-width interval above 0
    assert same.low == same.high == pytest.approx(0.01) and same.verdict == "better"
    zero = t_interval([0.0, 0.0])
    assert zero.verdict == "level"  # an interval [0, 0] is not above 0
    with pytest.raises(ValueError, match="confidence"):
        t_interval([1.0, 2.0], confidence=1.0)
    assert Interval(0.0123, 0.001, 0.0236, 3).format() == "+1.23 [+0.10, +2.36]"
    assert Interval(-0.0123, -0.0236, -0.001, 3).format(signed=False) == "-1.23 [-2.36, -0.10]"


def test_pairs_use_shared_seeds_and_every_kind():
    recs = []
    # rll beats triplet by 1, 2, 3 points at seeds 0-2; triplet lacks seed 3, so rll's seed 3 is not paired
    for s, (a, b) in enumerate([(0.50, 0.49), (0.60, 0.58), (0.55, 0.52), (0.9, None)]):
        recs.append(rec("rll", "ours", s, a))
        if b is not None:
            recs.append(rec("triplet", "pml", s, b))
    # namr-rll vs its base rll: -4, -5, -6 points
    for s, d in enumerate([0.04, 0.05, 0.06]):
        recs.append(rec("namr-rll", "ours", s, recs[2 * s]["metrics"]["mean_average_precision_at_r"] - d))
    # tuned rll: +2, +2, +2 over untuned at seeds 0-2
    for s in range(3):
        recs.append(
            rec("rll", "ours", s, recs[2 * s]["metrics"]["mean_average_precision_at_r"] + 0.02, variant="tuned")
        )
    rows = {(r.kind, r.variant, r.a, r.b): r for r in stats.pair_rows(recs)}
    m = "mean_average_precision_at_r"
    iv = rows[("ours-pml", "untuned", "rll", "triplet")].intervals[m]
    assert iv.n == 3 and iv.mean == pytest.approx(0.02) and iv.verdict == "level"
    assert iv.high - iv.mean == pytest.approx(4.3027 * 0.01 / math.sqrt(3), abs=1e-5)
    iv = rows[("variant-base", "untuned", "namr-rll", "rll")].intervals[m]
    assert iv.mean == pytest.approx(-0.05) and iv.verdict == "worse"
    assert ("ours-pml", "untuned", "namr-rll", "triplet") in rows
    iv = rows[("tuned-untuned", "tuned - untuned", "rll", "rll")].intervals[m]
    assert iv.mean == pytest.approx(0.02) and iv.n == 3 and iv.verdict == "better"
    # only untuned rows have a PML partner among the tuned runs: no tuned ours-pml rows
    assert not [k for k in rows if k[0] == "ours-pml" and k[1] == "tuned"]

    md = stats.markdown(recs)
    assert "| rll | triplet | 3 | +2.00 [-0.48, +4.48] | level |" in md
    assert "| namr-rll | rll | 3 | -5.00 [-7.48, -2.52] | worse |" in md
    assert "Student's t" in md
    lines = list(csv.reader(io.StringIO(stats.csv_text(recs))))
    assert lines[0][:6] == ["kind", "variant", "a", "b", "metric", "n_seeds"]
    row = next(x for x in lines if x[:5] == ["ours-pml", "untuned", "rll", "triplet", m])
    assert float(row[6]) == pytest.approx(0.02) and row[-1] == "level"
    # the per-loss table: rll untuned over 4 seeds (0.50, 0.60, 0.55, 0.90), tuned over 3
    table = stats.per_loss_markdown(recs)
    assert "| rll | ours | 4/3 | 63.75 [" in table


def test_exports_and_report_hook(tmp_path):
    recs = [
        rec(n, f, s, 0.4 + 0.01 * s + 0.02 * i)
        for i, (n, f) in enumerate([("rll", "ours"), ("ms", "pml")])
        for s in range(3)
    ]
    recs += [dict(r, variant="tuned") for r in recs]
    out = str(tmp_path)
    paths = stats.write_exports(recs, out, "a title")
    assert set(paths) == {"verdict_markdown", "verdict_csv", "verdict_figure"}
    assert os.path.getsize(paths["verdict_figure"]) > 5_000
    # the runner's report carries the same tables and files
    tuning = {
        "folds": [[0], [1]],
        "trials": 1,
        "sampler": {"seed": 0, "n_startup_trials": 4},
        "records": [],
        "defaults": {"rll": {}, "ms": {}},
        "spaces": {"rll": {}, "ms": {}},
    }
    paths = report.write_reports(recs, str(tmp_path / "r"), "# header", tuning=tuning)
    md = open(paths["markdown"]).read()
    assert (
        "Paired differences with 95% intervals and verdicts" in md
        and "| rll | ms | 3 | -2.00 [-2.00, -2.00] | worse |" in md
    )
    assert os.path.isfile(paths["verdict_figure"]) and os.path.isfile(paths["verdict_csv"])
    # the command line rewrites them from the export
    os.remove(paths["verdict_csv"])
    assert stats.main([str(tmp_path / "r")]) == 0 and os.path.isfile(paths["verdict_csv"])
    assert stats.main([str(tmp_path / "missing")]) == 2
