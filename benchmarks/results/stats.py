"""Paired differences with 95% confidence intervals and verdicts, from the runner's records.

For two losses a and b run at the same paired seeds (same initial weights, batches and augmentations), the
per-seed differences d_s = metric(a, s) - metric(b, s) are treated as a sample: the interval is Student's t
interval of their mean, ``mean(d) +- t_{0.975, n-1} * std(d, ddof=1) / sqrt(n)`` over the n seeds both have (a
paired t interval over seeds). The verdict says which side of zero the whole interval lies on: ``better`` (a
ahead of b at 95%), ``worse``, or ``level`` (the interval contains 0). With fewer than 2 shared seeds there is no
interval and the verdict is ``n/a``. Each interval stands alone (no correction for the number of pairs shown).

Three families of pairs, each for the tuned runs and the untuned (default) runs when the records have both:

* ours (and a user's) vs PML: every loss of family ``ours``/``user`` against every ``pml`` loss;
* variant vs its base: a NAMR or cross-batch-memory entry against the entry it wraps (``namr-rll`` vs ``rll``,
  ``rll-xbm`` vs ``rll``), when both were run;
* tuned vs untuned: each loss's tuned runs against its default runs at the same seeds.

``python -m benchmarks.stats OUT`` rewrites ``OUT/verdict.md``, ``OUT/verdict.csv`` and ``OUT/verdict.png`` (MAP@R
per loss with 95% intervals, tuned and untuned side by side) from the export ``OUT/results.jsonl``; the runner
writes the same files after every command (and the tables into ``results.md``).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..core.common import atomic_write, atomic_write_png

CONFIDENCE = 0.95
METRICS = ("mean_average_precision_at_r", "precision_at_1")
SHORT = {"mean_average_precision_at_r": "MAP@R", "precision_at_1": "P@1"}
VERDICTS = ("better", "level", "worse", "n/a")


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided t confidence interval; ``low``/``high`` are NaN when ``n < 2``."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def verdict(self) -> str:
        """``better`` (interval above 0), ``worse`` (below 0), ``level`` (contains 0), ``n/a`` (no interval)."""
        if self.n < 2 or math.isnan(self.low):
            return "n/a"
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "level"

    def format(self, scale: float = 100.0, signed: bool = True, digits: int = 2) -> str:
        """``+1.23 [+0.45, +2.01]`` (in points with ``scale`` 100); ``–`` without values."""
        if self.n == 0 or math.isnan(self.mean):
            return "–"
        f = "+" if signed else ""
        if self.n < 2:
            return f"{self.mean * scale:{f}.{digits}f} (1 seed)"
        return (
            f"{self.mean * scale:{f}.{digits}f} [{self.low * scale:{f}.{digits}f}, {self.high * scale:{f}.{digits}f}]"
        )


def t_interval(values: Sequence[float | None], confidence: float = CONFIDENCE) -> Interval:
    """Student's t interval of the mean of ``values`` (None and NaN dropped)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    n = len(v)
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    mean = float(v.mean())
    if n < 2:
        return Interval(mean, float("nan"), float("nan"), 1)
    from scipy.stats import t

    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * float(v.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def _by_seed(records: list[dict], loss: str, metric: str) -> dict[int, float]:
    out = {}
    for r in records:
        if r["loss"] == loss and r.get("metrics", {}).get(metric) is not None:
            out[int(r["seed"])] = float(r["metrics"][metric])
    return out


def paired_interval(
    a: list[dict], b: list[dict], loss_a: str, loss_b: str, metric: str, confidence: float = CONFIDENCE
) -> Interval:
    """The t interval of ``metric(loss_a) - metric(loss_b)`` over the seeds both have (``a``, ``b``: records)."""
    xa, xb = _by_seed(a, loss_a, metric), _by_seed(b, loss_b, metric)
    return t_interval([xa[s] - xb[s] for s in sorted(set(xa) & set(xb))], confidence)


# ------------------------------------------------------------------------------------------------ the pairs
def _variant(records: list[dict], variant: str) -> list[dict]:
    return [r for r in records if r.get("variant", "untuned") == variant]


def _losses(records: list[dict]) -> list[str]:
    """Loss names in first-seen order, ours/user before PML (the order of the runner's tables)."""
    seen: dict[str, int] = {}
    fam: dict[str, str] = {}
    for r in records:
        seen.setdefault(r["loss"], len(seen))
        fam[r["loss"]] = r.get("family", "user")
    rank = {"ours": 0, "user": 1, "pml": 2}
    return sorted(seen, key=lambda n: (rank.get(fam[n], 1), seen[n]))


def base_of(loss: str) -> str | None:
    """The registry entry a NAMR or cross-batch-memory entry wraps (None for other losses and unknown names)."""
    from ..losses.registry import REGISTRY

    entry = REGISTRY.get(loss)
    return entry.base if entry is not None else None


@dataclass(frozen=True)
class PairRow:
    """One compared pair: ``a - b`` per metric, on ``variant`` runs (``"tuned - untuned"`` for the tuning pairs)."""

    kind: str  # "ours-pml", "variant-base", "tuned-untuned"
    variant: str
    a: str
    b: str
    intervals: dict[str, Interval]


def pair_rows(records: list[dict], confidence: float = CONFIDENCE) -> list[PairRow]:
    """Every pair of the three kinds (module docstring) that the records allow, for each variant present."""
    variants = [v for v in ("tuned", "untuned") if _variant(records, v)]
    rows: list[PairRow] = []

    def add(kind: str, variant: str, a_recs: list[dict], b_recs: list[dict], a: str, b: str) -> None:
        iv = {m: paired_interval(a_recs, b_recs, a, b, m, confidence) for m in METRICS}
        if any(i.n for i in iv.values()):
            rows.append(PairRow(kind, variant, a, b, iv))

    for variant in variants:
        recs = _variant(records, variant)
        fam = {r["loss"]: r.get("family", "user") for r in recs}
        names = _losses(recs)
        for a in (n for n in names if fam[n] != "pml"):
            for b in (n for n in names if fam[n] == "pml"):
                add("ours-pml", variant, recs, recs, a, b)
        for a in names:
            base = base_of(a)
            if base is not None and base in fam:
                add("variant-base", variant, recs, recs, a, base)
    if len(variants) == 2:
        tuned, untuned = _variant(records, "tuned"), _variant(records, "untuned")
        untuned_names = set(_losses(untuned))
        for a in _losses(tuned):
            if a in untuned_names:
                add("tuned-untuned", "tuned - untuned", tuned, untuned, a, a)
    return rows


# ------------------------------------------------------------------------------------------------ exports
_TITLES = {
    "ours-pml": "ours − PML",
    "variant-base": "NAMR / cross-batch memory − the loss it wraps",
    "tuned-untuned": "tuned − untuned, same loss",
}


def per_loss_markdown(records: list[dict], confidence: float = CONFIDENCE) -> str:
    """Per loss: test MAP@R and P@1, mean over seeds with its t interval, untuned and tuned side by side."""
    variants = [v for v in ("untuned", "tuned") if _variant(records, v)]
    if not variants:
        return ""
    pct = f"{confidence * 100:g}%"
    heads = [f"{v} {SHORT[m]} [{pct}]" for m in METRICS for v in variants]
    buf = io.StringIO()
    buf.write(f"| loss | family | seeds | {' | '.join(heads)} |\n|" + "---|" * (3 + len(heads)) + "\n")
    fam = {r["loss"]: r.get("family", "user") for r in records}
    for loss in _losses(records):
        ivs = {
            (m, v): t_interval(list(_by_seed(_variant(records, v), loss, m).values()), confidence)
            for m in METRICS
            for v in variants
        }
        seeds = "/".join(str(ivs[(METRICS[0], v)].n) for v in variants)
        cells = [ivs[(m, v)].format(signed=False) for m in METRICS for v in variants]
        buf.write(f"| {loss} | {fam[loss]} | {seeds} | " + " | ".join(cells) + " |\n")
    return buf.getvalue()


def markdown(records: list[dict], confidence: float = CONFIDENCE) -> str:
    """The per-loss table and the interval tables in Markdown (empty without records)."""
    if not records:
        return ""
    rows = pair_rows(records, confidence)
    pct = f"{confidence * 100:g}%"
    buf = io.StringIO()
    buf.write(
        f"## Test split with {pct} intervals\n\nMean over seeds in %, with the {pct} t interval of the mean"
        " (seeds: untuned/tuned).\n\n" + per_loss_markdown(records, confidence)
    )
    if not rows:
        return buf.getvalue()
    buf.write(
        f"\n## Paired differences with {pct} intervals and verdicts\n\n"
        f"Mean of the per-seed differences a − b in points, with its {pct} confidence interval (Student's t over "
        f"the paired seeds both losses have: mean ± t(n−1) · std / √n). Verdict: better / worse when the whole "
        f"interval lies above / below 0, level when it contains 0, n/a with fewer than 2 seeds. Each interval stands "
        f"alone (not corrected for the number of pairs).\n"
    )
    groups: dict[tuple[str, str], list[PairRow]] = {}
    for r in rows:
        groups.setdefault((r.kind, r.variant), []).append(r)
    heads = " | ".join(f"Δ {SHORT[m]} [{pct}] | verdict" for m in METRICS)
    for (kind, variant), rs in groups.items():
        suffix = "" if kind == "tuned-untuned" else f" ({variant})"
        buf.write(f"\n### {_TITLES[kind]}{suffix}\n\n| a | b | seeds | {heads} |\n")
        buf.write("|" + "---|" * (3 + 2 * len(METRICS)) + "\n")
        for r in rs:
            cells = []
            for m in METRICS:
                cells += [r.intervals[m].format(), r.intervals[m].verdict]
            buf.write(f"| {r.a} | {r.b} | {r.intervals[METRICS[0]].n} | " + " | ".join(cells) + " |\n")
    return buf.getvalue()


def csv_text(records: list[dict], confidence: float = CONFIDENCE) -> str:
    """One line per (pair, metric): kind, variant, a, b, metric, n, mean, low, high, verdict (fractions, not %)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["kind", "variant", "a", "b", "metric", "n_seeds", "mean", "low", "high", "confidence", "verdict"])
    for r in pair_rows(records, confidence):
        for m in METRICS:
            iv = r.intervals[m]
            nums = [f"{x:.6f}" if not math.isnan(x) else "" for x in (iv.mean, iv.low, iv.high)]
            w.writerow([r.kind, r.variant, r.a, r.b, m, iv.n, *nums, confidence, iv.verdict])
    return buf.getvalue()


def write_figure(records: list[dict], path: str, title: str = "", confidence: float = CONFIDENCE) -> str | None:
    """MAP@R per loss with its t interval over seeds, tuned and untuned side by side; None without matplotlib or
    records."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    metric = METRICS[0]
    variants = [v for v in ("untuned", "tuned") if _variant(records, v)]
    if not variants:
        return None
    names = _losses(records)
    fam = {r["loss"]: r.get("family", "user") for r in records}
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.55 * len(names) + 2), 5.0))
    shades = {"untuned": 0.45, "tuned": 0.95}
    for j, variant in enumerate(variants):
        recs = _variant(records, variant)
        xs, ys, lo, hi, colors = [], [], [], [], []
        for i, loss in enumerate(names):
            vals = list(_by_seed(recs, loss, metric).values())
            if not vals:
                continue
            iv = t_interval(vals, confidence)
            xs.append(i + (j - (len(variants) - 1) / 2) * width)
            ys.append(iv.mean * 100)
            lo.append(0.0 if iv.n < 2 else (iv.mean - iv.low) * 100)
            hi.append(0.0 if iv.n < 2 else (iv.high - iv.mean) * 100)
            colors.append("tab:red" if fam[loss] == "ours" else ("tab:green" if fam[loss] == "user" else "tab:blue"))
        ax.bar(xs, ys, width=width * 0.95, color=colors, alpha=shades[variant], label=variant, edgecolor="black")
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="none", ecolor="black", capsize=3, linewidth=1)
    finite = [r["metrics"][metric] * 100 for r in records if r.get("metrics", {}).get(metric) is not None]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 5), min(100.0, max(finite) + 3))
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(f"test {SHORT[metric]} (%)")
    ax.set_title(
        (title + "\n" if title else "")
        + f"mean over seeds with {confidence * 100:g}% t intervals\nred = ours, blue = PML; "
        + ("pale = untuned, dark = tuned" if len(variants) == 2 else variants[0]),
        fontsize=8,
        wrap=True,
    )
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    atomic_write_png(fig, path)
    return path


def write_exports(records: list[dict], out_dir: str, title: str = "") -> dict[str, str]:
    """Write ``verdict.md``, ``verdict.csv`` and ``verdict.png`` into ``out_dir``; return their paths."""
    paths = {
        "verdict_markdown": os.path.join(out_dir, "verdict.md"),
        "verdict_csv": os.path.join(out_dir, "verdict.csv"),
        "verdict_figure": os.path.join(out_dir, "verdict.png"),
    }
    atomic_write(paths["verdict_markdown"], markdown(records) or "No pair with shared seeds.\n")
    atomic_write(paths["verdict_csv"], csv_text(records))
    if write_figure(records, paths["verdict_figure"], title) is None:
        paths.pop("verdict_figure")
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.stats",
        description="Rewrite verdict.md/csv/png (paired t intervals over seeds, verdicts, MAP@R figure) from an "
        "output folder's results.jsonl.",
    )
    p.add_argument("out", help="an output folder of the runner (holding results.jsonl)")
    p.add_argument("--title", default="", help="figure title")
    args = p.parse_args(argv)
    from .records import load_jsonl

    path = os.path.join(args.out, "results.jsonl")
    records = load_jsonl(path)
    if not records:
        print(f"error: {path}: no records", file=sys.stderr)
        return 2
    for k, v in write_exports(records, args.out, args.title).items():
        print(f"{k}: {v}")
    print(markdown(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
