"""Where the validation learning curves flatten: the budget at which a head-to-head ranks what the losses reach.

The curves come from the tuning folds of ``python -m benchmarks.run --tune`` with ``--eval-every``: every fold run
evaluates its held-out fold (training classes only; the test split is never read) every ``--eval-every`` epochs.
For each loss (and each configuration tried) the curves of all its fold runs, over folds and seeds, are averaged
at the iterations they share, and:

* the curve is **flat at budget T** when its values at the evaluations in the last quarter of [0, T] (from 0.75 T
  to T, at least two of them) lie within ``--tolerance`` points (0.3 MAP@R points by default);
* it **flattens at** the smallest evaluated T from which it is flat at every later evaluated budget too;
* **flat at the end**: flat at the longest budget measured (otherwise a longer run is needed to say).

``python -m benchmarks.convergence OUT`` reads the results store of ``OUT`` (or ``--storage URL``), prints one line
per (loss, configuration) and the budget at which every selected loss has flattened. The command that measures the
curves is in docs/verdict.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PRIMARY = "mean_average_precision_at_r"


@dataclass(frozen=True)
class Convergence:
    """One loss's (configuration's) mean validation curve and where it flattens.

    Attributes:
        loss: registry name.
        config: ``"defaults"`` or a short hash of the hyper-parameters.
        runs: fold runs averaged.
        iterations: the evaluated iterations shared by every run.
        values: the mean validation metric at those iterations (fractions).
        flattens_at: the smallest budget from which the curve stays flat, or None.
        last_quarter_range: max - min over the last quarter of the whole curve (fraction), NaN if not assessable.
    """

    loss: str
    config: str
    runs: int
    iterations: tuple[int, ...]
    values: tuple[float, ...]
    flattens_at: int | None
    last_quarter_range: float

    def flat_at_end(self, tolerance: float) -> bool:
        return not math.isnan(self.last_quarter_range) and self.last_quarter_range <= tolerance


def window_range(iterations: Sequence[int], values: Sequence[float], budget: int, window: float = 0.25) -> float:
    """max - min of ``values`` at the iterations in [(1 - window) * budget, budget]; NaN with fewer than 2."""
    lo = (1.0 - window) * budget
    inside = [v for i, v in zip(iterations, values) if lo <= i <= budget]
    return float(max(inside) - min(inside)) if len(inside) >= 2 else float("nan")


def flattens_at(
    iterations: Sequence[int], values: Sequence[float], tolerance: float, window: float = 0.25
) -> int | None:
    """The smallest evaluated budget T > 0 such that the curve is flat (:func:`window_range` <= ``tolerance``) at T
    and at every evaluated budget after T; None when it is not flat at the last one."""
    if len(iterations) != len(values):
        raise ValueError(f"iterations and values differ in length: {len(iterations)} != {len(values)}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")
    if not 0.0 < window <= 1.0:
        raise ValueError(f"window must be in (0, 1], got {window}")
    order = sorted(range(len(iterations)), key=lambda k: iterations[k])
    its = [int(iterations[k]) for k in order]
    vals = [float(values[k]) for k in order]
    found = None
    for t in reversed([i for i in its if i > 0]):
        r = window_range(its, vals, t, window)
        if math.isnan(r) or r > tolerance:
            break
        found = t
    return found


def mean_curve(curves: list[list[dict]], metric: str = PRIMARY) -> tuple[list[int], list[float]]:
    """The mean of ``metric`` over ``curves`` at the iterations every curve has."""
    if not curves:
        return [], []
    per = [{int(p["iteration"]): p[metric] for p in c if p.get(metric) is not None} for c in curves]
    shared = sorted(set.intersection(*(set(d) for d in per)))
    return shared, [float(np.mean([d[i] for d in per])) for i in shared]


def _config_label(loss: str, hparams: dict) -> str:
    from ..losses.registry import REGISTRY

    entry = REGISTRY.get(loss)
    if entry is not None and entry.defaults() == hparams:
        return "defaults"
    return hashlib.sha1(json.dumps(hparams, sort_keys=True, default=str).encode()).hexdigest()[:8]


def analyse(
    records: list[dict],
    tolerance: float = 0.003,
    window: float = 0.25,
    losses: Sequence[str] | None = None,
    metric: str = PRIMARY,
) -> list[Convergence]:
    """One :class:`Convergence` per (loss, hyper-parameters, budget) among ``records`` (fold records with learning
    curves of at least two evaluations); ``tolerance`` in the metric's units (0.003 = 0.3 MAP@R points)."""
    groups: dict[tuple[str, str, int], list[list[dict]]] = {}
    hps: dict[tuple[str, str, int], dict] = {}
    for r in records:
        if losses is not None and r.get("loss") not in losses:
            continue
        curve = r.get("curve") or []
        if len(curve) < 2:
            continue
        hp = r.get("hparams", {})
        key = (r["loss"], json.dumps(hp, sort_keys=True, default=str), int(r.get("iterations", 0)))
        groups.setdefault(key, []).append(curve)
        hps[key] = hp
    out = []
    for key, curves in groups.items():
        its, vals = mean_curve(curves, metric)
        end = max(its) if its else 0
        out.append(
            Convergence(
                loss=key[0],
                config=_config_label(key[0], hps[key]),
                runs=len(curves),
                iterations=tuple(its),
                values=tuple(vals),
                flattens_at=flattens_at(its, vals, tolerance, window) if its else None,
                last_quarter_range=window_range(its, vals, end, window) if its else float("nan"),
            )
        )
    order = {n: i for i, n in enumerate(losses or [])}
    out.sort(key=lambda c: (order.get(c.loss, len(order)), c.loss, c.config != "defaults", c.config, -len(c.values)))
    return out


def report(results: list[Convergence], tolerance: float, window: float = 0.25) -> str:
    """A Markdown table of ``results`` and the budget at which every loss has flattened."""
    tol = tolerance * 100
    lines = [
        f"Validation MAP@R (mean over folds and seeds, %); flat = within {tol:g} points over the last "
        f"{window * 100:g}% of the budget.\n",
        "| loss | configuration | fold runs | iterations | final | last-quarter range | flat at the end | "
        "flattens at |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in results:
        end = c.iterations[-1] if c.iterations else 0
        rng = "–" if math.isnan(c.last_quarter_range) else f"{c.last_quarter_range * 100:.2f}"
        lines.append(
            f"| {c.loss} | {c.config} | {c.runs} | {end} | {c.values[-1] * 100:.2f} | {rng} | "
            f"{'yes' if c.flat_at_end(tolerance) else 'no'} | {c.flattens_at if c.flattens_at else '–'} |"
        )
    if not results:
        return "No fold records with learning curves (run --tune with --eval-every > 0).\n"
    budget = verdict_budget(results)
    if budget is None:
        lines.append(
            "\nNot every curve is flat by the end: measure a longer budget (a larger --epochs) to find the "
            "verdict budget."
        )
    else:
        lines.append(f"\nEvery curve above has flattened by {budget} iterations.")
    return "\n".join(lines) + "\n"


def verdict_budget(results: list[Convergence]) -> int | None:
    """The smallest budget at which every one of ``results`` has flattened, None if one has not."""
    points = [c.flattens_at for c in results]
    if not points or any(p is None for p in points):
        return None
    return max(p for p in points if p is not None)


def timing(records: list[dict]) -> str:
    """Where a run's time goes, per loss, from the records' own clocks: training (the trainer's loop: data
    loading, forward, backward, optimizer, per-iteration logging), evaluations (the learning curve's and the final
    one), and the rest of the run (building models and loss, record-keeper setup: ``wall_seconds`` minus both)."""
    rows = [r for r in records if r.get("train_seconds") is not None and r.get("wall_seconds")]
    if not rows:
        return "No timed runs.\n"
    lines = [
        "| loss | runs | iterations | ms/iteration | training s | evaluation s | other s | run wall s | "
        "evaluation + other |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["loss"], []).append(r)
    for loss, rs in by.items():
        tr = float(np.mean([r["train_seconds"] for r in rs]))
        ev = float(np.mean([r["eval_seconds"] for r in rs]))
        wall = float(np.mean([r["wall_seconds"] for r in rs]))
        its = int(np.mean([r["iterations"] for r in rs]))
        lines.append(
            f"| {loss} | {len(rs)} | {its} | {tr / max(1, its) * 1000:.1f} | {tr:.1f} | {ev:.1f} | "
            f"{wall - tr - ev:.1f} | {wall:.1f} | {(wall - tr) / wall * 100:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def study_estimate(run_seconds: float, losses: int, trials: int, folds: int, seeds: int, jobs: int) -> dict:
    """Runs and wall time of a ``--tune`` study: every loss gets ``trials x folds`` fold runs and ``2 x seeds`` test
    runs (tuned and untuned; fewer when the tuned configuration is the defaults), ``jobs`` at a time, each taking
    ``run_seconds`` (fold runs train as many iterations as test runs)."""
    for name, v in (("losses", losses), ("trials", trials), ("folds", folds), ("seeds", seeds), ("jobs", jobs)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    fold_runs, test_runs = losses * trials * folds, losses * 2 * seeds
    return {
        "fold_runs": fold_runs,
        "test_runs": test_runs,
        "hours": (fold_runs + test_runs) * run_seconds / jobs / 3600,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.convergence",
        description="Where the validation learning curves (the --tune fold runs' --eval-every evaluations) flatten.",
    )
    p.add_argument("out", nargs="?", default=None, help="the runner's output folder (its results.db)")
    p.add_argument("--storage", default=None, help="the results store's database URL instead of OUT/results.db")
    p.add_argument("--losses", default=None, help="comma-separated loss names (default: every loss with curves)")
    p.add_argument("--tolerance", type=float, default=0.3, help="flat = within this many MAP@R points (0.3)")
    p.add_argument("--window", type=float, default=0.25, help="the last fraction of the budget examined (0.25)")
    p.add_argument("--curves", action="store_true", help="also print each mean curve")
    p.add_argument(
        "--timing",
        action="store_true",
        help="print where the store's runs spent their time instead (training, evaluation, the rest), and the "
        "wall time of a --tune study at the mean run time (--study-losses, --trials, --folds, --seeds, --jobs)",
    )
    g = p.add_argument_group("the study that --timing estimates (default: the verdict study)")
    g.add_argument("--study-losses", type=int, default=None, help="losses (default: every registry entry)")
    g.add_argument("--trials", type=int, default=12)
    g.add_argument("--folds", type=int, default=2)
    g.add_argument("--seeds", type=int, default=5)
    g.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    if args.storage is None and args.out is None:
        p.error("give the output folder OUT or --storage URL")
    if not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        p.error(f"--tolerance must be >= 0 points, got {args.tolerance}")
    if not 0 < args.window <= 1:
        p.error(f"--window must be in (0, 1], got {args.window}")
    url = args.storage
    if url is None:
        path = os.path.join(args.out, "results.db")
        if not os.path.isfile(path):
            p.error(f"{args.out}: no results.db (give the runner's --out folder, or --storage)")
        url = "sqlite:///" + os.path.abspath(path)
    from .store import ResultStore

    store = ResultStore(url)
    try:
        records = store.records(kind=None if args.timing else "fold")
    finally:
        store.close()
    if args.timing:
        from ..losses.registry import REGISTRY

        print(timing(records))
        walls = [r["wall_seconds"] for r in records if r.get("wall_seconds") and r.get("train_seconds") is not None]
        if not walls:
            return 1
        n = args.study_losses if args.study_losses is not None else len(REGISTRY)
        try:
            est = study_estimate(float(np.mean(walls)), n, args.trials, args.folds, args.seeds, args.jobs)
        except ValueError as e:
            p.error(str(e))
        print(
            f"A study of {n} losses x {args.trials} trials x {args.folds} folds, then {args.seeds} seeds tuned and "
            f"untuned: {est['fold_runs']} fold runs + at most {est['test_runs']} test runs; at {np.mean(walls):.0f} s "
            f"per run (the mean above) and {args.jobs} runs at a time: about {est['hours']:.1f} hours."
        )
        return 0
    losses = [s.strip() for s in args.losses.split(",") if s.strip()] if args.losses else None
    results = analyse(records, args.tolerance / 100, args.window, losses)
    print(report(results, args.tolerance / 100, args.window))
    if args.curves:
        for c in results:
            pts = ", ".join(f"{i}: {v * 100:.2f}" for i, v in zip(c.iterations, c.values))
            print(f"{c.loss} ({c.config}): {pts}")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
