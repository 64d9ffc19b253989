"""How the loss speed benchmark reports: the ratio rows, the Markdown tables, the PNG figure, the output files."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, Callable

from ..core.common import atomic_write, atomic_write_png
from .cases import CASES, SAMPLES_PER_CLASS, RatioSpec, Workload

JSON_NAME, MD_NAME, PNG_NAME = "loss_speed.json", "loss_speed.md", "loss_speed.png"


def workload_of(cfg: dict[str, Any]) -> Workload:
    """The workload recorded in a run's configuration."""
    return Workload(cfg["dim"], cfg.get("inputs", "random"), cfg.get("ref_size", 0), cfg.get("seed", 0))


def compute_ratios(
    results: dict[str, dict[str, dict[str, Any]]], batch_sizes: Sequence[int], specs: Sequence[RatioSpec]
) -> list[dict[str, Any]]:
    """The ratio rows of the speed targets, from a results dict ``{loss: {str(B): entry}}``.

    An entry holds ``time_status``/``median_ms`` and ``mem_status``/``peak_mib``. A ratio whose batch size was
    not in the run, or whose inputs were not measured, gets ``value`` None and a ``reason``.
    """
    rows = []
    for spec in specs:
        title, kind, num, den, target = spec.title, spec.kind, spec.numerator, spec.denominator, spec.target
        for b in spec.batch_sizes if spec.batch_sizes is not None else batch_sizes:
            row: dict[str, Any] = {
                "title": title,
                "kind": kind,
                "numerator": num,
                "denominator": den,
                "batch_size": b,
                "target": target,
                "value": None,
                "met": None,
            }
            if b not in batch_sizes:
                row["reason"] = f"B={b} not in this run"
                rows.append(row)
                continue
            vals: list[float] | None = []
            mins = []
            for name in (num, den):
                e = results.get(name, {}).get(str(b), {})
                if kind == "time":
                    ok, v = e.get("time_status") == "ok", e.get("median_ms")
                    mins.append(e.get("min_ms"))
                else:
                    ok, v = e.get("mem_status") == "ok", e.get("peak_mib")
                if not ok or v is None or vals is None:
                    vals = None
                    row["reason"] = f"{name} {kind} not measured at B={b}"
                    break
                vals.append(float(v))
            if vals is not None:
                if vals[1] <= 0:
                    row["reason"] = f"{den} {kind} is {vals[1]:.3g} (not positive)"
                else:
                    row["value"] = vals[0] / vals[1]
                    row["met"] = None if target is None else bool(row["value"] <= target)
                    lo_num, lo_den = mins if len(mins) == 2 else (None, None)
                    if lo_num is not None and lo_den is not None and lo_den > 0:
                        row["value_of_minima"] = lo_num / lo_den
            rows.append(row)
    return rows


def _cell_time(e: dict[str, Any]) -> str:
    st = e.get("time_status")
    if st == "ok":
        return f"{e['median_ms']:.3g}" if e["median_ms"] < 100 else f"{e['median_ms']:.0f}"
    if st in ("skipped", "unavailable", "failed"):
        return f"{st} ({e.get('time_reason', '')})"
    return "not run"


def _cell_min(e: dict[str, Any]) -> str:
    if e.get("time_status") == "ok" and e.get("min_ms") is not None:
        return f"{e['min_ms']:.3g}" if e["min_ms"] < 100 else f"{e['min_ms']:.0f}"
    return _cell_time(e)


def _cell_mem(e: dict[str, Any]) -> str:
    st = e.get("mem_status")
    if st == "ok":
        return f"{e['peak_mib']:.3g}" if abs(e["peak_mib"]) < 100 else f"{e['peak_mib']:.0f}"
    if st in ("skipped", "unavailable", "failed"):
        return f"{st} ({e.get('mem_reason', '')})"
    return "not run"


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def _table(
    names: Sequence[str], bs: Sequence[int], results: dict[str, Any], cell: Callable[[dict[str, Any]], str]
) -> str:
    lines = ["| loss | " + " | ".join(f"B={b}" for b in bs) + " |", "|---|" + "---:|" * len(bs)]
    for n in names:
        label = CASES[n].label if n in CASES else n
        cells = [_md_escape(cell(results.get(n, {}).get(str(b), {}))) for b in bs]
        lines.append(f"| {_md_escape(label)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(doc: dict[str, Any]) -> str:
    cfg, results, names = doc["config"], doc["results"], doc["config"]["losses"]
    bs = cfg["batch_sizes"]
    mem_how = "fresh subprocess per cell, peak RSS" if cfg["device"] == "cpu" else "torch.cuda.max_memory_allocated"
    parts = [
        "### Loss speed and memory\n\n"
        f"- device: {cfg['device_name']} ({cfg['device']}); torch threads: {cfg['torch_num_threads']}; "
        f"torch {cfg['torch_version']}, pytorch-metric-learning {cfg['pml_version']}, Python {cfg['python']}\n"
        f"- input: {workload_of(cfg).describe()}{'; every loss under torch.compile' if cfg.get('compile') else ''}, "
        f"labels = B/{SAMPLES_PER_CLASS} classes x {SAMPLES_PER_CLASS}; "
        f"median of {cfg['repeats']} interleaved repeats after {cfg['warmup']} warm-up steps\n"
        f"- command: `{cfg['command']}`\n"
        f"- date: {cfg['started']}",
        "Forward+backward time (ms, median):\n\n" + _table(names, bs, results, _cell_time),
    ]
    if cfg["memory"]:
        parts.append(f"Peak memory above baseline (MiB; {mem_how}):\n\n" + _table(names, bs, results, _cell_mem))
    rows = ["| ratio | B | value | goal | met | ratio of minima |", "|---|---:|---:|---:|---|---:|"]
    for r in doc["ratios"]:
        value = f"{r['value']:.3f}" if r["value"] is not None else f"n/a ({r.get('reason', '')})"
        target = f"<= {r['target']}" if r["target"] is not None else "-"
        met = {True: "yes", False: "**no**", None: "-"}[r["met"]]
        vmin = f"{r['value_of_minima']:.3f}" if r.get("value_of_minima") is not None else "-"
        rows.append(f"| {r['title']} | {r['batch_size']} | {_md_escape(value)} | {target} | {met} | {vmin} |")
    parts.append(
        "Ratios (the project's speed goals, on the medians; met = value <= goal; the ratio of the "
        "fastest repeats is a check against disturbance by other processes):\n\n" + "\n".join(rows)
    )
    parts.append(
        "Fastest repeat (ms; far below the median means other processes disturbed the run):\n\n"
        + _table(names, bs, results, _cell_min)
    )
    notes = []
    for n in names:
        if n in CASES:
            spec = CASES[n]
            cap = f" Skipped at B > {spec.max_batch}: {spec.max_batch_reason}." if spec.max_batch else ""
            details = sorted({e["detail"] for e in results.get(n, {}).values() if e.get("detail")})
            why = "".join(f" Unavailable: {d}." for d in details)
            notes.append(f"- `{n}`: {spec.note}.{cap}{why}")
    parts.append("Losses:\n\n" + "\n".join(notes))
    return "\n\n".join(parts) + "\n"


def render_png(doc: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    cfg, results = doc["config"], doc["results"]
    panels = [("time", "median_ms", "forward+backward time (ms)")]
    if cfg["memory"]:
        panels.append(("mem", "peak_mib", "peak memory above baseline (MiB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    for ax, (kind, key, ylabel) in zip(axes[0], panels):
        for n in cfg["losses"]:
            pts = [
                (int(b), e[key])
                for b, e in results.get(n, {}).items()
                if e.get(f"{kind}_status") == "ok" and e.get(key) is not None and e[key] > 0
            ]
            if not pts:
                continue
            pts.sort()
            style = dict(linestyle="--", color="black") if n == "floor" else {}
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                label=CASES[n].label if n in CASES else n,
                **style,
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(cfg["batch_sizes"])
        ax.set_xticklabels([str(b) for b in cfg["batch_sizes"]])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("batch size B")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"D={cfg['dim']}, {cfg['device_name']}, {cfg['torch_num_threads']} threads", fontsize=9)
    fig.tight_layout()
    atomic_write_png(fig, path)


def write_outputs(doc: dict[str, Any], out_dir: str, png: bool, specs: Sequence[RatioSpec]) -> None:
    """Write the JSON (everything), the Markdown tables and, with ``png``, the figure, each atomically."""
    doc["ratios"] = compute_ratios(doc["results"], doc["config"]["batch_sizes"], specs)
    atomic_write(os.path.join(out_dir, JSON_NAME), (json.dumps(doc, indent=1) + "\n").encode())
    atomic_write(os.path.join(out_dir, MD_NAME), render_markdown(doc).encode())
    if png:
        render_png(doc, os.path.join(out_dir, PNG_NAME))
