"""Exports of the results store: JSON lines, Markdown and CSV tables, a PNG figure, a printed summary.

All files are regenerated from the store's records of the command (never appended to), each written atomically:

* ``results.jsonl``: one JSON object per run (loss, variant, seed) of the command.
* ``results.md`` / ``results.csv``: mean ± std over seeds per loss, and for each of our (and the user's) losses the
  paired difference to each PML loss (mean ± std over the seeds both have; per-seed differences, not differences
  of means). With ``--tune``: per loss the tuned hyper-parameters and validation score, the tuned test table
  beside the untuned one, and the paired tuned − untuned differences; ``trials.csv`` lists every trial.
* ``results.png``: MAP@R and P@1 per loss with error bars (std over seeds) and test-split learning curves.
* ``verdict.md`` / ``verdict.csv`` / ``verdict.png`` (:mod:`benchmarks.stats`): paired differences with 95% t
  intervals over seeds and verdicts (also appended to ``results.md``), MAP@R per loss with intervals.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Sequence

import numpy as np

from ..core.common import atomic_write, atomic_write_png
from . import stats
from .metrics import METRICS, SHORT_NAMES
from .records import load_jsonl as load_jsonl  # report.load_jsonl: the readers of the exports
from .records import write_jsonl

TABLE_METRICS = METRICS
PAIRED_METRICS = ("mean_average_precision_at_r", "precision_at_1")


# ------------------------------------------------------------------------------------------------ aggregation
def _mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def ordered_losses(records: Iterable[dict]) -> list[str]:
    seen: dict[str, int] = {}
    for r in records:
        seen.setdefault(r["loss"], len(seen))
    fam = {r["loss"]: r["family"] for r in records}
    rank = {"ours": 0, "user": 1, "pml": 2}
    return sorted(seen, key=lambda n: (rank.get(fam[n], 1), seen[n]))


def aggregate(records: list[dict], metrics: Sequence[str] = TABLE_METRICS) -> list[dict]:
    rows = []
    for loss in ordered_losses(records):
        rs = [r for r in records if r["loss"] == loss]
        row = {"loss": loss, "family": rs[0]["family"], "seeds": len(rs)}
        for m in list(metrics) + [f"{p}_{m}" for p in ("plain", "reranked") for m in metrics]:
            vals = [r["metrics"].get(m) for r in rs if m in r["metrics"]]
            if vals:
                row[m] = _mean_std(vals)
        row["seconds_per_iteration"] = _mean_std([r["seconds_per_iteration"] for r in rs])
        row["untrained_map_at_r"] = _mean_std(
            [r["untrained"].get("mean_average_precision_at_r") for r in rs if r.get("untrained")]
        )
        rows.append(row)
    return rows


def paired_differences(records: list[dict], metric: str) -> dict[tuple[str, str], tuple[float, float, int]]:
    """(ours, pml) -> mean ± std over shared seeds of (ours - pml) for ``metric``."""
    by = {(r["loss"], int(r["seed"])): r["metrics"].get(metric) for r in records}
    ours = [n for n in ordered_losses(records) if any(r["loss"] == n and r["family"] != "pml" for r in records)]
    pml = [n for n in ordered_losses(records) if any(r["loss"] == n and r["family"] == "pml" for r in records)]
    out = {}
    for a in ours:
        for b in pml:
            seeds = sorted({s for (n, s) in by if n == a} & {s for (n, s) in by if n == b})
            diffs = [by[(a, s)] - by[(b, s)] for s in seeds if by[(a, s)] is not None and by[(b, s)] is not None]
            out[(a, b)] = _mean_std(diffs)
    return out


# ------------------------------------------------------------------------------------------------ tables
def _fmt(ms: tuple[float, float, int] | None, scale: float = 100.0, signed: bool = False, digits: int = 2) -> str:
    if ms is None or ms[2] == 0 or math.isnan(ms[0]):
        return "–"
    mean, std, n = ms
    sign = "+" if signed and mean >= 0 else ""
    spread = "n/a" if n < 2 else f"{std * scale:.{digits}f}"  # no spread over a single seed
    return f"{sign}{mean * scale:.{digits}f} ± {spread}"


def markdown_tables(records: list[dict], header: str = "") -> str:
    """The test table (mean ± std over seeds), NAMR's plain-retrieval table and the paired-difference tables."""
    rows = aggregate(records)
    buf = io.StringIO()
    if header:
        buf.write(header.rstrip() + "\n\n")
    cols = [SHORT_NAMES[m] for m in TABLE_METRICS]
    buf.write("Mean ± std over seeds, in % (NMI × 100); reported at the last epoch (no model selection on test).\n\n")
    buf.write("| loss | family | seeds | " + " | ".join(cols) + " | untrained MAP@R | ms/iter |\n")
    buf.write("|" + "---|" * (len(cols) + 5) + "\n")
    for row in rows:
        cells = [_fmt(row.get(m)) for m in TABLE_METRICS]
        ms = row["seconds_per_iteration"]
        buf.write(
            f"| {row['loss']} | {row['family']} | {row['seeds']} | "
            + " | ".join(cells)
            + f" | {_fmt(row['untrained_map_at_r'])} | {ms[0] * 1000:.1f} |\n"
        )
    plain_rows = [r for r in rows if any(k.startswith("plain_") for k in r)]
    if plain_rows:
        pm = [m for m in TABLE_METRICS if m != "NMI"]
        buf.write(
            "\nNAMR variants, plain Euclidean retrieval on the sample embedding (the table above shows each entry's "
            "default retrieval, plain or re-ranked):\n\n"
        )
        buf.write("| loss | " + " | ".join(SHORT_NAMES[m] for m in pm) + " |\n|" + "---|" * (len(pm) + 1) + "\n")
        for r in plain_rows:
            buf.write(f"| {r['loss']} | " + " | ".join(_fmt(r.get("plain_" + m)) for m in pm) + " |\n")
        buf.write(rerank_table(records))
    for metric in PAIRED_METRICS:
        diffs = paired_differences(records, metric)
        if not diffs:
            continue
        ours = list(dict.fromkeys(a for a, _ in diffs))
        pml = list(dict.fromkeys(b for _, b in diffs))
        buf.write(
            f"\nPaired difference in {SHORT_NAMES[metric]} (points), ours/user − PML: mean ± std over the per-seed "
            "differences (same seeds, same initial weights, batches and augmentations):\n\n"
        )
        buf.write("| ours \\ PML | " + " | ".join(pml) + " |\n|" + "---|" * (len(pml) + 1) + "\n")
        for a in ours:
            buf.write(f"| {a} | " + " | ".join(_fmt(diffs[(a, b)], signed=True) for b in pml) + " |\n")
    return buf.getvalue()


def paired_interval(diffs: Sequence[float]) -> tuple[float, float, float, float]:
    """(mean, std, low, high) of paired differences: the two-sided 95% t interval of their mean (NaN below 2)."""
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        mean = float(d.mean()) if len(d) else float("nan")
        return mean, float("nan"), float("nan"), float("nan")
    mean, std = float(d.mean()), float(d.std(ddof=1))
    half = float(stats.t.ppf(0.975, len(d) - 1)) * std / math.sqrt(len(d))
    return mean, std, mean - half, mean + half


def rerank_table(records: list[dict]) -> str:
    """NAMR entries: plain and re-ranked retrieval side by side, with the paired difference and its 95% interval."""
    by: dict[str, dict[int, dict]] = {}
    for r in records:
        m = r["metrics"]
        if "plain_mean_average_precision_at_r" in m and "reranked_mean_average_precision_at_r" in m:
            by.setdefault(r["loss"], {})[int(r["seed"])] = m
    if not by:
        return ""
    lines = [
        "\nNAMR variants, re-ranking by the structure embedding against plain retrieval (the same trained models; "
        "paired difference: mean ± std over seeds and its 95% t interval), in points:\n",
        "| loss | seeds | metric | plain | re-ranked | re-ranked − plain | 95% interval |",
        "|---|---|---|---|---|---|---|",
    ]
    for loss, seeds in by.items():
        for metric in PAIRED_METRICS:
            plain = [seeds[s][f"plain_{metric}"] * 100 for s in sorted(seeds)]
            rer = [seeds[s][f"reranked_{metric}"] * 100 for s in sorted(seeds)]
            mean, std, lo, hi = paired_interval([a - b for a, b in zip(rer, plain)])
            lines.append(
                f"| {loss} | {len(seeds)} | {SHORT_NAMES[metric]} | {np.mean(plain):.2f} | {np.mean(rer):.2f} | "
                f"{mean:+.2f} ± {std:.2f} | [{lo:+.2f}, {hi:+.2f}] |"
            )
    return "\n".join(lines) + "\n"


def write_csv(records: list[dict], path: str) -> None:
    rows = aggregate(records)
    buf = io.StringIO()
    w = csv.writer(buf)
    metric_cols = list(TABLE_METRICS) + [f"plain_{m}" for m in TABLE_METRICS if m != "NMI"]
    head = ["table", "loss", "family", "seeds"]
    for m in metric_cols:
        head += [f"{m}_mean", f"{m}_std"]
    head += ["untrained_map_at_r_mean", "seconds_per_iteration"]
    w.writerow(head)
    for r in rows:
        line = ["summary", r["loss"], r["family"], r["seeds"]]
        for m in metric_cols:
            ms = r.get(m)
            line += [f"{ms[0]:.6f}", f"{ms[1]:.6f}"] if ms and ms[2] else ["", ""]
        line += [f"{r['untrained_map_at_r'][0]:.6f}", f"{r['seconds_per_iteration'][0]:.6f}"]
        w.writerow(line)
    w.writerow([])
    w.writerow(["table", "ours", "pml", "metric", "paired_diff_mean", "paired_diff_std", "n_seeds"])
    for metric in PAIRED_METRICS:
        for (a, b), (mean, std, n) in paired_differences(records, metric).items():
            w.writerow(["paired", a, b, metric, f"{mean:.6f}", f"{std:.6f}", n])
    atomic_write(path, buf.getvalue())


# ------------------------------------------------------------------------------------------------ figure
def loss_colours(names: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """One distinct colour per loss (matplotlib's tab10, then lighter tab20 and tab20b colours), the same in every
    panel of the figure."""
    import matplotlib

    cmaps = matplotlib.colormaps
    palette = [cmaps["tab10"](i) for i in range(10)] + [cmaps["tab20"](2 * i + 1) for i in range(10)]
    palette += [cmaps["tab20b"](i) for i in range(20)]
    return {n: tuple(float(c) for c in palette[i % len(palette)]) for i, n in enumerate(names)}


def write_figure(records: list[dict], path: str, title: str = "") -> str | None:
    """Write :func:`build_figure` as a PNG, atomically; None (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:  # pragma: no cover
        return None
    fig = build_figure(records, title)
    atomic_write_png(fig, path)
    return path


def build_figure(records: list[dict], title: str = ""):
    """MAP@R and P@1 bars per loss (value axes from zero, error bars: std over seeds) and test-split learning
    curves; each loss has one colour in every panel, ours and the user's hatched (bars) and solid (curves)."""
    import matplotlib.pyplot as plt

    rows = aggregate(records)
    names = [r["loss"] for r in rows]
    colour = loss_colours(names)  # one colour per loss in every panel
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    for ax, metric in zip(axes[:2], ("mean_average_precision_at_r", "precision_at_1")):
        means = [r.get(metric, (np.nan, 0, 0))[0] * 100 for r in rows]
        stds = [r.get(metric, (0, 0, 0))[1] * 100 for r in rows]
        bars = ax.bar(range(len(names)), means, yerr=stds, color=[colour[n] for n in names], capsize=3, alpha=0.9)
        for bar, row in zip(bars, rows):
            if row["family"] != "pml":
                bar.set_hatch("//")
                bar.set_edgecolor("black")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel(f"{SHORT_NAMES[metric]} (%)")
        tops = [m + sd for m, sd in zip(means, stds) if not math.isnan(m)]
        ax.set_ylim(0.0, min(100.0, max(tops) * 1.08) if tops and max(tops) > 0 else 100.0)  # from zero
        ax.set_title(f"{SHORT_NAMES[metric]} (mean ± std over seeds; hatched = ours/user)")
        ax.grid(axis="y", alpha=0.3)
    ax = axes[2]
    for loss in names:
        rs = [r for r in records if r["loss"] == loss and len(r.get("curve", [])) > 1]
        if not rs:
            continue
        its = sorted({p["iteration"] for r in rs for p in r["curve"]})
        ys = []
        for it in its:
            vals = [p.get("mean_average_precision_at_r") for r in rs for p in r["curve"] if p["iteration"] == it]
            ys.append(np.nanmean([v for v in vals if v is not None]) * 100)
        ls = "-" if rs[0]["family"] != "pml" else "--"
        ax.plot(its, ys, ls, marker=".", color=colour[loss], label=loss)
    ax.set_ylim(bottom=0.0)
    ax.set_xlabel("training iteration")
    ax.set_ylabel("test MAP@R (%), mean over seeds")
    ax.set_title("learning curves (solid = ours/user, dashed = PML)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, "no learning curves (--eval-every 0)", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _variant(records: list[dict], variant: str) -> list[dict]:
    return [r for r in records if r.get("variant", "untuned") == variant]


def _fmt_params(params: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()) or "–"


def tuning_tables(records: list[dict], tuning: dict) -> str:
    """Per loss: trials, validation score of the best trial, its hyper-parameters; then tuned − untuned per seed."""
    buf = io.StringIO()
    folds = tuning["folds"]
    buf.write(
        f"## Tuning: {tuning['trials']} trials per loss, {len(folds)} class-disjoint folds of the training classes "
        f"({', '.join(str(len(f)) for f in folds)} classes)\n\n"
        "Optuna TPE sampler "
        f"(seed {tuning['sampler']['seed']}, {tuning['sampler']['n_startup_trials']} start-up trials: trial 0 = the "
        "defaults, then random draws); "
        "trial k of every loss uses seed k. A trial trains on all folds but one and scores MAP@R on the held-out "
        "fold; its value is the mean over folds. The test split is not read while tuning.\n\n"
        "| loss | trials | best validation MAP@R | validation MAP@R at defaults | tuned hyper-parameters | "
        "search space |\n|---|---|---|---|---|---|\n"
    )
    by_loss: dict[str, list[dict]] = {}
    for t in tuning["records"]:
        by_loss.setdefault(t["loss"], []).append(t)
    for loss, space in tuning["spaces"].items():
        ts = by_loss.get(loss, [])
        valid = [t for t in ts if t.get("value") is not None]
        best = max(valid, key=lambda t: (t["value"], -t["slot"])) if valid else None
        defaults = tuning["defaults"][loss]
        at_default = [t["value"] for t in valid if all(t["hparams"].get(k) == defaults.get(k) for k in space)]
        default_slots = {t["slot"] for t in valid if all(t["hparams"].get(k) == defaults.get(k) for k in space)}
        cells = [
            loss,
            f"{len(valid)}/{len(ts)}" if ts else "0 (nothing to tune)",
            f"{best['value'] * 100:.2f} (trial {best['slot']})" if best else "–",
            f"{at_default[0] * 100:.2f}" if at_default else "not tried",
            (_fmt_params(best["params"]) + (" (the defaults)" if best["slot"] in default_slots else ""))
            if best
            else "defaults",
            "; ".join(f"{k} {v}" for k, v in space.items()) or "–",
        ]
        buf.write("| " + " | ".join(cells) + " |\n")
    tuned, untuned = _variant(records, "tuned"), _variant(records, "untuned")
    by = {(r["loss"], int(r["seed"])): r for r in untuned}
    buf.write(
        "\nTest split, tuned − untuned (points), mean ± std over the per-seed differences (same seeds):\n\n"
        "| loss | tuned MAP@R | untuned MAP@R | Δ MAP@R | tuned P@1 | untuned P@1 | Δ P@1 |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    for loss in ordered_losses(tuned) if tuned else []:
        row = [loss]
        for m in PAIRED_METRICS:
            pairs = [
                (r["metrics"].get(m), by[(loss, int(r["seed"]))]["metrics"].get(m))
                for r in tuned
                if r["loss"] == loss and (loss, int(r["seed"])) in by
            ]
            row += [
                _fmt(_mean_std([a for a, _ in pairs])),
                _fmt(_mean_std([b for _, b in pairs])),
                _fmt(_mean_std([a - b for a, b in pairs]), signed=True),
            ]
        buf.write("| " + " | ".join(row) + " |\n")
    return buf.getvalue()


def _code_line(code: dict) -> str:
    digests = code.get("digests") or {}
    line = f"pml_rll {code.get('pml_rll_version', '?')}, sources " + ", ".join(f"{k} {v}" for k, v in digests.items())
    git = code.get("git")
    if git:
        line += f", checkout {git['commit'][:12]}" + (" with uncommitted changes" if git.get("dirty") else "")
    return line


def code_section(records: list[dict]) -> str:
    """Which code made the rows: the package version and source digests (benchmarks/core/provenance.py), and per loss
    the digest of each class's source file. Every digest is part of the rows' store keys."""
    codes = [r["code"] for r in records if r.get("code")]
    if not codes:
        return ""
    buf = io.StringIO()
    buf.write("Code that made these rows (SHA-256 of the sources; each digest is part of the results' keys):\n\n")
    for line in dict.fromkeys(_code_line(c) for c in codes):
        buf.write(f"* {line}\n")
    per_loss: dict[str, dict[str, str]] = {}
    for r in records:
        per_loss.setdefault(r["loss"], {}).update((r.get("code") or {}).get("classes") or {})
    if any(per_loss.values()):
        buf.write("\n| loss | classes (source file digest) |\n|---|---|\n")
        for loss in ordered_losses(records):
            cells = ", ".join(f"{p.split(':')[-1]} {d}" for p, d in per_loss.get(loss, {}).items())
            buf.write(f"| {loss} | {cells or '–'} |\n")
    return buf.getvalue()


def markdown_report(records: list[dict], header: str = "", tuning: dict | None = None) -> str:
    """The whole Markdown report: the test tables, and with tuning the tuned tables beside the untuned ones; last,
    the code that made the rows."""
    code = code_section(records)
    if tuning is None:
        return (
            markdown_tables(records, header)
            + "\n"
            + stats.markdown(records)  # intervals (benchmarks/results/stats.py)
            + ("\n" + code if code else "")
        )
    parts = [header.rstrip() + "\n" if header else "", tuning_tables(records, tuning)]
    parts.append("\n## Test split, tuned hyper-parameters\n\n" + markdown_tables(_variant(records, "tuned")))
    parts.append("\n## Test split, untuned (defaults)\n\n" + markdown_tables(_variant(records, "untuned")))
    parts.append(stats.markdown(records))  # 95% intervals and verdicts (benchmarks/results/stats.py)
    if code:
        parts.append("\n## Code\n\n" + code)
    return "\n".join(p for p in parts if p)


def write_trials_csv(trials: list[dict], path: str) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["loss", "slot", "seed", "value", "fold_values", "params", "errors", "seconds"])
    for t in sorted(trials, key=lambda t: (t["loss"], t["slot"])):
        w.writerow(
            [
                t["loss"],
                t["slot"],
                t["seed"],
                "" if t["value"] is None else f"{t['value']:.6f}",
                json.dumps(t["fold_values"]),
                json.dumps(t["params"], sort_keys=True),
                "; ".join(t.get("errors", [])),
                f"{t.get('seconds', 0.0):.1f}",
            ]
        )
    atomic_write(path, buf.getvalue())


def write_reports(records: list[dict], out_dir: str, header: str = "", tuning: dict | None = None) -> dict[str, str]:
    """Write results.jsonl, results.md, results.csv and results.png (and trials.csv when tuning) from ``records``
    (and the tuning summary); return their paths. The figure shows the tuned runs when there are any."""
    paths = {
        "jsonl": os.path.join(out_dir, "results.jsonl"),
        "markdown": os.path.join(out_dir, "results.md"),
        "csv": os.path.join(out_dir, "results.csv"),
        "figure": os.path.join(out_dir, "results.png"),
    }
    write_jsonl(paths["jsonl"], records)
    atomic_write(paths["markdown"], markdown_report(records, header, tuning))
    shown = _variant(records, "tuned") if tuning is not None else records
    write_csv(shown, paths["csv"])
    if tuning is not None:
        paths["untuned_csv"] = os.path.join(out_dir, "results_untuned.csv")
        write_csv(_variant(records, "untuned"), paths["untuned_csv"])
        paths["trials"] = os.path.join(out_dir, "trials.csv")
        write_trials_csv(tuning["records"], paths["trials"])
    if write_figure(shown, paths["figure"], title=header.splitlines()[0].lstrip("# ") if header else "") is None:
        paths.pop("figure")
    paths.update(stats.write_exports(records, out_dir, header.splitlines()[0].lstrip("# ") if header else ""))
    return paths
