"""Loss speed and memory benchmark: forward+backward time and peak memory per loss and batch size.

Run from the repository root::

    python -m benchmarks.loss_speed                      # full default sweep, CPU or CUDA (auto)
    python -m benchmarks.loss_speed --batch-sizes 256 512 --losses rll_paper pml_rll floor --no-memory

What is measured
----------------
* Input: ``randn(B, D, requires_grad=True)`` and labels ``arange(B) // 4`` (B/4 classes, 4 samples each).
  Losses that take a packed ``[x | s]`` input (the NAMR entries) get ``x = randn(B, D)`` and a positive
  ``s`` of the same width, so their input is ``(B, 2D)``.
* Time: one *step* is ``loss = fn(emb, labels); loss.backward()`` (gradients are cleared outside the timed
  region). Per batch size, every loss first runs ``--warmup`` steps, then ``--repeats`` rounds; in each round
  every loss runs one step, the losses being visited round-robin with the starting loss rotated each round, so
  that slow drifts of the machine affect all losses alike. The reported figure is the median. Timing uses
  ``time.perf_counter`` with ``torch.cuda.synchronize`` before and after the step on CUDA.
* Peak memory on CPU: each (loss, batch size) runs in a fresh subprocess. After the imports, the input
  allocation, the loss construction and one small warm-up step (B=8, so that lazy library initialisation is not
  counted), the process's peak resident set size is reset (``/proc/self/clear_refs``) and the current RSS taken
  as the baseline; one step is run; the figure is ``VmHWM - baseline``. Where the peak cannot be reset, the
  figure is ``ru_maxrss - baseline`` (an upper bound, flagged in the JSON).
* Peak memory on CUDA: in-process, ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats``,
  minus the memory allocated just before the step.
* The "floor" entry is the cheapest conceivable pairwise loss: ``F.normalize`` then ``(e @ e.T).sum()``.

Outputs (written atomically into ``--out``): ``loss_speed.json`` (everything, including raw samples; rewritten
after each batch size, so ``--resume`` can continue an interrupted run), ``loss_speed.md`` (tables and the
ratios asked for by the speed targets) and ``loss_speed.png`` (log-log time and memory against batch size).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .common import atomic_write, device_name, resolve_device
from .registry import default as registry_default

RLL_MARGIN, RLL_TN = registry_default("rll", "margin"), registry_default("rll", "Tn")  # the runner's defaults

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BATCH_SIZES = (128, 256, 512, 1024, 2048, 4096)
SAMPLES_PER_CLASS = 4
JSON_NAME, MD_NAME, PNG_NAME = "loss_speed.json", "loss_speed.md", "loss_speed.png"
MIB = 2.0**20

# A step: takes (input, labels), returns the scalar loss (backward is called by the harness).
Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Unavailable(Exception):
    """Raised by a registry factory when the loss cannot be built here (missing class, wrong signature).

    ``short`` goes into the tables, ``detail`` (the underlying error) into the JSON and the notes.
    """

    def __init__(self, short: str, detail: str):
        super().__init__(short)
        self.short, self.detail = short, detail


def _import_ours(name: str):
    try:
        import pml_rll.losses as ours

        return getattr(ours, name)
    except (ImportError, AttributeError) as e:
        raise Unavailable("not importable", f"pml_rll.losses.{name}: {e}") from e


def _construct(cls, call: str, *args, **kwargs):
    try:
        return cls(*args, **kwargs)
    except TypeError as e:
        raise Unavailable("constructor signature differs", f"{call}: {e}") from e


# ----------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """One benchmarked loss.

    ``build(batch_size, dim, device)`` returns ``(step, modules)``: the step function and the modules whose
    parameters receive gradients (their grads are cleared between steps). It raises ``Unavailable`` when the
    loss cannot be constructed. ``packed`` losses receive a ``(B, 2D)`` input ``[x | s]`` with ``s > 0``.
    ``max_batch`` skips larger batch sizes, with ``max_batch_reason`` shown in the table.
    """

    name: str
    label: str
    build: Callable[[int, int, torch.device], tuple[Step, list[torch.nn.Module]]]
    note: str = ""
    packed: bool = False
    max_batch: int | None = None
    max_batch_reason: str = ""


def _ours_rll(gradient: str):
    def build(batch_size: int, dim: int, device: torch.device):
        cls = _import_ours("RankedListLoss")
        call = f"RankedListLoss(margin={RLL_MARGIN}, Tn={RLL_TN}, gradient={gradient!r})"
        loss = _construct(cls, call, margin=RLL_MARGIN, Tn=RLL_TN, gradient=gradient).to(device)
        return loss, [loss]

    return build


def _pml_rll(batch_size, dim, device):
    import warnings

    from pytorch_metric_learning.losses import RankedListLoss

    with warnings.catch_warnings():  # PML warns about Tn > 5 at construction; Tn=10 is the paper's value
        warnings.simplefilter("ignore")
        loss = RankedListLoss(margin=RLL_MARGIN, Tn=RLL_TN).to(device)
    return loss, [loss]


def _multi_similarity(batch_size, dim, device):
    from pytorch_metric_learning.losses import MultiSimilarityLoss

    loss = MultiSimilarityLoss().to(device)
    return loss, [loss]


def _contrastive(batch_size, dim, device):
    from pytorch_metric_learning.losses import ContrastiveLoss

    loss = ContrastiveLoss().to(device)
    return loss, [loss]


def _triplet_all(batch_size, dim, device):
    from pytorch_metric_learning.losses import TripletMarginLoss
    from pytorch_metric_learning.miners import TripletMarginMiner

    loss = TripletMarginLoss().to(device)
    miner = TripletMarginMiner(type_of_triplets="all").to(device)

    def step(emb, labels):
        return loss(emb, labels, miner(emb, labels))

    return step, [loss, miner]


def _proxy_anchor(batch_size, dim, device):
    from pytorch_metric_learning.losses import ProxyAnchorLoss

    loss = ProxyAnchorLoss(num_classes=batch_size // SAMPLES_PER_CLASS, embedding_size=dim).to(device)
    return loss, [loss]


def _multi_cluster_ranking(batch_size, dim, device):
    cls = _import_ours("MultiClusterRankingLoss")
    loss = _construct(cls, f"MultiClusterRankingLoss(embedding_size={dim})", embedding_size=dim).to(device)
    return loss, [loss]


def _namr_ms(batch_size, dim, device):
    from pytorch_metric_learning.losses import MultiSimilarityLoss

    cls = _import_ours("NAMRLoss")
    loss = _construct(
        cls, f"NAMRLoss(MultiSimilarityLoss(), embedding_size={dim})", MultiSimilarityLoss(), embedding_size=dim
    ).to(device)
    return loss, [loss]


def _floor(batch_size, dim, device):
    def step(emb, labels):
        e = F.normalize(emb, p=2, dim=1)
        return (e @ e.T).sum()

    return step, []


REGISTRY: dict[str, LossSpec] = {
    s.name: s
    for s in [
        LossSpec(
            "rll_paper",
            "ours RankedListLoss (paper grad)",
            _ours_rll("paper"),
            note="pml_rll RankedListLoss(margin=0.4, Tn=10, gradient='paper')",
        ),
        LossSpec(
            "rll_autograd",
            "ours RankedListLoss (autograd)",
            _ours_rll("autograd"),
            note="pml_rll RankedListLoss(margin=0.4, Tn=10, gradient='autograd')",
        ),
        LossSpec(
            "pml_rll", "PML RankedListLoss", _pml_rll, note="pytorch_metric_learning RankedListLoss(margin=0.4, Tn=10)"
        ),
        LossSpec(
            "multi_similarity",
            "PML MultiSimilarityLoss",
            _multi_similarity,
            note="MultiSimilarityLoss() defaults, no miner",
        ),
        LossSpec("contrastive", "PML ContrastiveLoss", _contrastive, note="ContrastiveLoss() defaults, all pairs"),
        LossSpec(
            "triplet_all",
            "PML Triplet + miner (all)",
            _triplet_all,
            note="TripletMarginLoss() with TripletMarginMiner(type_of_triplets='all'); miner time included",
            max_batch=1024,
            max_batch_reason="all-triplets mining is O(B^3)",
        ),
        LossSpec(
            "proxy_anchor",
            "PML ProxyAnchorLoss",
            _proxy_anchor,
            note="ProxyAnchorLoss(num_classes=B/4, embedding_size=D); proxies receive gradients",
        ),
        LossSpec(
            "multi_cluster_ranking",
            "ours MultiClusterRankingLoss",
            _multi_cluster_ranking,
            packed=True,
            note="pml_rll MultiClusterRankingLoss(embedding_size=D) on a packed (B, 2D) input",
        ),
        LossSpec(
            "namr_ms",
            "ours NAMRLoss(MultiSimilarity)",
            _namr_ms,
            packed=True,
            note="pml_rll NAMRLoss(MultiSimilarityLoss(), embedding_size=D) on a packed (B, 2D) input; "
            "its overhead is this row minus the MultiSimilarity row (which sees a (B, D) input)",
        ),
        LossSpec(
            "floor",
            "floor: normalize + Gram",
            _floor,
            note="F.normalize(emb) then (e @ e.T).sum(): one matmul forward, two backward",
        ),
    ]
}

# The ratios the speed targets are stated in: (title, kind, numerator, denominator, batch sizes, target).
# kind is "time" (median forward+backward) or "memory" (peak memory above baseline). A target of None is
# informational only. Batch sizes of None mean "every batch size of the run".
RATIO_SPECS: list[tuple[str, str, str, str, tuple[int, ...] | None, float | None]] = [
    ("time ours (paper) / PML RankedListLoss", "time", "rll_paper", "pml_rll", (512, 1024), 0.5),
    ("time ours (paper) / floor", "time", "rll_paper", "floor", (1024, 2048), 1.0),
    ("peak memory ours (paper) / PML RankedListLoss", "memory", "rll_paper", "pml_rll", (4096,), 0.5),
    ("peak memory ours (autograd) / PML RankedListLoss", "memory", "rll_autograd", "pml_rll", (4096,), None),
    ("time ours (autograd) / ours (paper)", "time", "rll_autograd", "rll_paper", None, 1.5),
]


# ----------------------------------------------------------------------------------------------------------
# Inputs and steps
# ----------------------------------------------------------------------------------------------------------


def make_labels(batch_size: int, device: torch.device) -> torch.Tensor:
    return torch.div(torch.arange(batch_size, device=device), SAMPLES_PER_CLASS, rounding_mode="floor")


# "random": randn embeddings; after L2 normalisation all pairs lie near sqrt(2), so the Ranked List Loss sees every
# positive and no negative as non-trivial (a typical early-training regime).
# "hard": a shared direction plus class centres plus noise; about 17% of the negative pairs lie closer than
# alpha = 1.2 (many non-trivial negatives per query, the dense regime of the fast path).
INPUT_KINDS = ("random", "hard")
INPUT_DESCRIPTIONS = {
    "random": "randn",
    "hard": "0.7 * shared direction + class centre + 0.7 * randn (about 17% of negatives non-trivial)",
}
INPUTS = {"kind": "random"}


def make_input(spec: LossSpec, batch_size: int, dim: int, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed * 1000003 + batch_size)
    x = torch.randn(batch_size, dim, generator=g)
    if INPUTS["kind"] == "hard":
        shared = torch.randn(1, dim, generator=g)
        centres = torch.randn(batch_size // SAMPLES_PER_CLASS + 1, dim, generator=g)
        x = 0.7 * shared + centres[make_labels(batch_size, torch.device("cpu"))] + 0.7 * x
    if spec.packed:
        s = 0.5 + torch.rand(batch_size, dim, generator=g)  # strictly inside (0.5, 1.5), like the structure head
        x = torch.cat([x, s], dim=1)
    return x.to(device).requires_grad_(True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clear_grads(emb: torch.Tensor, modules: Sequence[torch.nn.Module]) -> None:
    emb.grad = None
    for m in modules:
        for p in m.parameters():
            p.grad = None


def run_step(step: Step, emb: torch.Tensor, labels: torch.Tensor) -> None:
    loss = step(emb, labels)
    loss.backward()


def timed_step(step: Step, emb, labels, modules, device) -> float:
    """One forward+backward, in milliseconds."""
    _clear_grads(emb, modules)
    _sync(device)
    t0 = time.perf_counter()
    run_step(step, emb, labels)
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


# ----------------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_memory_here(name: str, batch_size: int, dim: int, device: torch.device, seed: int) -> dict[str, Any]:
    """Peak memory of one step of one loss, in this process (CPU: call it in a fresh process)."""
    spec = REGISTRY[name]
    try:
        step, modules = spec.build(batch_size, dim, device)
    except Unavailable as e:
        return {"status": "unavailable", "reason": e.short, "detail": e.detail}
    labels = make_labels(batch_size, device)
    # warm-up on a tiny batch: lazy library initialisation (thread pools, kernels) is not the loss's memory
    small = 8
    small_step, small_modules = spec.build(small, dim, device)
    run_step(small_step, make_input(spec, small, dim, device, seed), make_labels(small, device))
    del small_step, small_modules
    emb = make_input(spec, batch_size, dim, device, seed)
    _clear_grads(emb, modules)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run_step(step, emb, labels)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"status": "ok", "peak_mib": (peak - base) / MIB, "method": "cuda.max_memory_allocated"}
    reset = _reset_peak_rss()
    base_kib = _proc_status_kib("VmRSS")
    if base_kib is None:
        return {"status": "failed", "reason": "/proc/self/status not readable: no RSS measurement on this OS"}
    run_step(step, emb, labels)
    if reset:
        peak_kib, method = _proc_status_kib("VmHWM"), "VmHWM after clear_refs reset"
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = "ru_maxrss (peak not resettable: upper bound)"
    return {"status": "ok", "peak_mib": (peak_kib - base_kib) / 1024.0, "method": method}


def measure_memory_subprocess(
    name: str, batch_size: int, dim: int, threads: int, seed: int, timeout_s: float
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.loss_speed",
        "--memory-worker",
        name,
        "--batch-sizes",
        str(batch_size),
        "--dim",
        str(dim),
        "--threads",
        str(threads),
        "--seed",
        str(seed),
        "--inputs",
        INPUTS["kind"],
        "--device",
        "cpu",
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"memory subprocess exceeded {timeout_s:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "failed", "reason": f"memory subprocess exit {proc.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------------------------------------
# Results helpers
# ----------------------------------------------------------------------------------------------------------


def _entry(results: dict[str, Any], name: str, batch_size: int) -> dict[str, Any]:
    return results.setdefault(name, {}).setdefault(str(batch_size), {})


def compute_ratios(results: dict[str, dict[str, dict[str, Any]]], batch_sizes: Sequence[int]) -> list[dict[str, Any]]:
    """The ratio rows of the speed targets, from a results dict ``{loss: {str(B): entry}}``.

    An entry holds ``time_status``/``median_ms`` and ``mem_status``/``peak_mib``. A ratio whose batch size was
    not in the run, or whose inputs were not measured, gets ``value`` None and a ``reason``.
    """
    rows = []
    for title, kind, num, den, bs_list, target in RATIO_SPECS:
        for b in bs_list if bs_list is not None else batch_sizes:
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
            vals, mins = [], []
            for name in (num, den):
                e = results.get(name, {}).get(str(b), {})
                if kind == "time":
                    ok, v = e.get("time_status") == "ok", e.get("median_ms")
                    mins.append(e.get("min_ms"))
                else:
                    ok, v = e.get("mem_status") == "ok", e.get("peak_mib")
                if not ok or v is None:
                    vals = None
                    row["reason"] = f"{name} {kind} not measured at B={b}"
                    break
                vals.append(v)
            if vals is not None:
                if vals[1] <= 0:
                    row["reason"] = f"{den} {kind} is {vals[1]:.3g} (not positive)"
                else:
                    row["value"] = vals[0] / vals[1]
                    row["met"] = None if target is None else bool(row["value"] <= target)
                    if kind == "time" and None not in mins and mins[1] > 0:
                        row["value_of_minima"] = mins[0] / mins[1]
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


def _table(names: Sequence[str], bs: Sequence[int], results: dict[str, Any], cell: Callable) -> str:
    lines = ["| loss | " + " | ".join(f"B={b}" for b in bs) + " |", "|---|" + "---:|" * len(bs)]
    for n in names:
        label = REGISTRY[n].label if n in REGISTRY else n
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
        f"- input: {INPUT_DESCRIPTIONS[cfg.get('inputs', 'random')]} (B, {cfg['dim']}), "
        f"labels = B/{SAMPLES_PER_CLASS} classes x {SAMPLES_PER_CLASS}; "
        f"median of {cfg['repeats']} interleaved repeats after {cfg['warmup']} warm-up steps\n"
        f"- command: `{cfg['command']}`\n"
        f"- date: {cfg['started']}",
        "Forward+backward time (ms, median):\n\n" + _table(names, bs, results, _cell_time),
    ]
    if cfg["memory"]:
        parts.append(f"Peak memory above baseline (MiB; {mem_how}):\n\n" + _table(names, bs, results, _cell_mem))
    rows = ["| ratio | B | value | target | met | ratio of minima |", "|---|---:|---:|---:|---|---:|"]
    for r in doc["ratios"]:
        value = f"{r['value']:.3f}" if r["value"] is not None else f"n/a ({r.get('reason', '')})"
        target = f"<= {r['target']}" if r["target"] is not None else "-"
        met = {True: "yes", False: "**no**", None: "-"}[r["met"]]
        vmin = f"{r['value_of_minima']:.3f}" if r.get("value_of_minima") is not None else "-"
        rows.append(f"| {r['title']} | {r['batch_size']} | {_md_escape(value)} | {target} | {met} | {vmin} |")
    parts.append(
        "Ratios (targets of the speed issue on the medians; met = value <= target; the ratio of the "
        "fastest repeats is a check against disturbance by other processes):\n\n" + "\n".join(rows)
    )
    parts.append(
        "Fastest repeat (ms; far below the median means other processes disturbed the run):\n\n"
        + _table(names, bs, results, _cell_min)
    )
    notes = []
    for n in names:
        if n in REGISTRY:
            spec = REGISTRY[n]
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
                label=REGISTRY[n].label if n in REGISTRY else n,
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
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def write_outputs(doc: dict[str, Any], out_dir: str, png: bool) -> None:
    doc["ratios"] = compute_ratios(doc["results"], doc["config"]["batch_sizes"])
    atomic_write(os.path.join(out_dir, JSON_NAME), (json.dumps(doc, indent=1) + "\n").encode())
    atomic_write(os.path.join(out_dir, MD_NAME), render_markdown(doc).encode())
    if png:
        render_png(doc, os.path.join(out_dir, PNG_NAME))


# ----------------------------------------------------------------------------------------------------------
# Main sweep
# ----------------------------------------------------------------------------------------------------------


def _versions() -> tuple[str, str]:
    import pytorch_metric_learning

    return torch.__version__, pytorch_metric_learning.__version__


# Fields that must agree for --resume to reuse earlier results.
_RESUME_KEYS = ("dim", "repeats", "warmup", "torch_num_threads", "device", "seed", "memory", "losses", "inputs")


def time_batch(
    names: list[str], batch_size: int, args, device: torch.device, results, too_slow: dict[str, str], bar
) -> None:
    """Warm-up then interleaved repeats of every runnable loss at one batch size."""
    runnable: dict[str, tuple[Step, list[torch.nn.Module], torch.Tensor]] = {}
    labels = make_labels(batch_size, device)
    for n in names:
        spec, e = REGISTRY[n], _entry(results, n, batch_size)
        if spec.max_batch is not None and batch_size > spec.max_batch:
            e.update(time_status="skipped", time_reason=f"{spec.max_batch_reason}; max B {spec.max_batch}", capped=True)
        elif n in too_slow:
            e.update(time_status="skipped", time_reason=too_slow[n])
        else:
            try:
                step, modules = spec.build(batch_size, args.dim, device)
            except Unavailable as exc:
                e.update(time_status="unavailable", time_reason=exc.short, detail=exc.detail)
            else:
                runnable[n] = (step, modules, make_input(spec, batch_size, args.dim, device, args.seed))
                continue
        bar.update(args.warmup + args.repeats)
    for n in list(runnable):
        step, modules, emb = runnable[n]
        for i in range(args.warmup):
            try:
                ms = timed_step(step, emb, labels, modules, device)
            except (RuntimeError, MemoryError) as exc:  # e.g. out of memory
                _entry(results, n, batch_size).update(time_status="failed", time_reason=str(exc).splitlines()[0][:160])
                too_slow[n] = f"failed at B={batch_size}"
                del runnable[n]
                bar.update(args.warmup + args.repeats - i)
                break
            bar.update(1)
            if ms > args.max_step_s * 1e3:
                too_slow[n] = f"one step took {ms / 1e3:.1f} s > {args.max_step_s:g} s at B={batch_size}"
                _entry(results, n, batch_size).update(time_status="skipped", time_reason=too_slow[n])
                del runnable[n]
                bar.update(args.warmup + args.repeats - i - 1)
                break
    samples: dict[str, list[float]] = {n: [] for n in runnable}
    order = list(runnable)
    for r in range(args.repeats):
        k = r % len(order) if order else 0
        for n in order[k:] + order[:k]:  # round-robin, starting loss rotated each repeat
            step, modules, emb = runnable[n]
            samples[n].append(timed_step(step, emb, labels, modules, device))
            bar.update(1)
    for n in order:
        e = _entry(results, n, batch_size)
        e.update(time_status="ok", median_ms=statistics.median(samples[n]), min_ms=min(samples[n]), times_ms=samples[n])
    del runnable
    gc.collect()


def memory_batch(names: list[str], batch_size: int, args, device: torch.device, results, bar) -> None:
    for n in names:
        e = _entry(results, n, batch_size)
        bar.set_postfix_str(f"{n} B={batch_size}")
        if e.get("mem_status") == "ok":
            pass
        elif e.get("time_status") in ("unavailable", "failed") or e.get("capped"):
            # a loss skipped only for slowness still gets its (single-step) memory measurement
            e.update(mem_status="skipped" if e.get("capped") else e["time_status"], mem_reason=e.get("time_reason", ""))
        elif args.memory_batch_sizes is not None and batch_size not in args.memory_batch_sizes:
            e.update(mem_status="skipped", mem_reason="not in --memory-batch-sizes")
        else:
            if device.type == "cpu":
                m = measure_memory_subprocess(n, batch_size, args.dim, args.threads, args.seed, args.memory_timeout_s)
            else:
                try:
                    m = measure_memory_here(n, batch_size, args.dim, device, args.seed)
                except RuntimeError as exc:
                    m = {"status": "failed", "reason": str(exc).splitlines()[0][:160]}
                gc.collect()
                torch.cuda.empty_cache()
            e["mem_status"] = m["status"]
            if m["status"] == "ok":
                e.update(peak_mib=m["peak_mib"], mem_method=m["method"])
            else:
                e["mem_reason"] = m.get("reason", "")
        bar.update(1)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.loss_speed",
        description="Forward+backward time and peak memory of metric-learning losses against batch size.",
        epilog="Losses: " + ", ".join(f"{n} ({s.label})" for n, s in REGISTRY.items()),
    )
    p.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=list(DEFAULT_BATCH_SIZES),
        help="batch sizes, multiples of 4, at least 8 (default: %(default)s)",
    )
    p.add_argument("--dim", type=int, default=512, help="embedding width D (default: %(default)s)")
    p.add_argument(
        "--repeats", type=int, default=9, help="timed repeats per loss and batch size (default: %(default)s)"
    )
    p.add_argument(
        "--warmup", type=int, default=2, help="untimed warm-up steps per loss and batch size (default: %(default)s)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: %(default)s)")
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto uses CUDA when present (default: %(default)s)",
    )
    p.add_argument(
        "--losses",
        nargs="+",
        default=list(REGISTRY),
        metavar="NAME",
        help="subset of losses by registry name (default: all)",
    )
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory measurements")
    p.add_argument(
        "--memory-batch-sizes",
        type=int,
        nargs="+",
        default=None,
        help="measure memory only at these batch sizes (default: all)",
    )
    p.add_argument(
        "--memory-timeout-s",
        type=float,
        default=600.0,
        help="time limit of one CPU memory subprocess (default: %(default)s)",
    )
    p.add_argument(
        "--max-step-s",
        type=float,
        default=30.0,
        help="a loss whose warm-up step takes longer is skipped at this and larger batch sizes (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: %(default)s)")
    p.add_argument(
        "--inputs",
        choices=INPUT_KINDS,
        default="random",
        help="random: randn embeddings (no non-trivial negatives for the Ranked List Loss); hard: "
        "clustered embeddings with ~17%% of negative pairs non-trivial (default: %(default)s)",
    )
    p.add_argument(
        "--out",
        default=os.path.join("results", "loss_speed"),
        help="output folder for loss_speed.{json,md,png} (default: %(default)s)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse batch sizes already complete in OUT/loss_speed.json when the settings agree",
    )
    p.add_argument("--no-plot", dest="plot", action="store_false", help="do not write the PNG")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.add_argument("--memory-worker", metavar="NAME", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    bad = [n for n in args.losses if n not in REGISTRY]
    if bad:
        p.error(f"--losses: unknown {bad}; known: {list(REGISTRY)}")
    for b in args.batch_sizes + (args.memory_batch_sizes or []):
        if b < 8 or b % SAMPLES_PER_CLASS:
            p.error(f"batch size {b}: must be a multiple of {SAMPLES_PER_CLASS} and at least 8")
    if args.dim < 1 or args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--dim, --repeats and --threads must be positive, --warmup non-negative")
    args.batch_sizes = sorted(set(args.batch_sizes))
    args.losses = list(dict.fromkeys(args.losses))
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    INPUTS["kind"] = args.inputs
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    if args.memory_worker is not None:  # internal: one memory measurement in this fresh process
        print(json.dumps(measure_memory_here(args.memory_worker, args.batch_sizes[0], args.dim, device, args.seed)))
        return {}

    from tqdm import tqdm

    torch_v, pml_v = _versions()
    cfg = {
        "batch_sizes": args.batch_sizes,
        "dim": args.dim,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": args.threads,
        "torch_num_threads": torch.get_num_threads(),
        "device": device.type,
        "device_name": device_name(device),
        "seed": args.seed,
        "inputs": args.inputs,
        "memory": args.memory,
        "losses": args.losses,
        "memory_batch_sizes": args.memory_batch_sizes,
        "max_step_s": args.max_step_s,
        "torch_version": torch_v,
        "pml_version": pml_v,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command": "python -m benchmarks.loss_speed " + " ".join(sys.argv[1:] if argv is None else list(argv)),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    results: dict[str, Any] = {}
    done: list[int] = []
    json_path = os.path.join(args.out, JSON_NAME)
    if args.resume and os.path.exists(json_path):
        with open(json_path) as f:
            old = json.load(f)
        if all(old["config"].get(k) == cfg[k] for k in _RESUME_KEYS):
            done = [b for b in old.get("done_batch_sizes", []) if b in args.batch_sizes]
            results = {
                n: {str(b): e for b, e in per.items() if int(b) in done}
                for n, per in old["results"].items()
                if n in args.losses
            }
            print(f"resuming: batch sizes {done} taken from {json_path}", file=sys.stderr)
        else:
            print(f"not resuming: settings differ from {json_path}", file=sys.stderr)
    doc = {"config": cfg, "results": results, "done_batch_sizes": done}

    todo = [b for b in args.batch_sizes if b not in done]
    too_slow: dict[str, str] = {}
    for n in args.losses:  # carry "too slow" over from resumed batch sizes
        for b in done:
            e = results.get(n, {}).get(str(b), {})
            if e.get("time_status") in ("skipped", "failed") and "B=" in e.get("time_reason", ""):
                too_slow[n] = e["time_reason"]
    total = len(todo) * len(args.losses) * (args.warmup + args.repeats + (1 if args.memory else 0))
    with tqdm(total=total, desc="loss_speed", unit="step", disable=not args.progress, dynamic_ncols=True) as bar:
        for b in todo:
            bar.set_postfix_str(f"timing B={b}")
            time_batch(args.losses, b, args, device, results, too_slow, bar)
            if args.memory:
                memory_batch(args.losses, b, args, device, results, bar)
            done.append(b)
            write_outputs(doc, args.out, png=False)  # checkpoint after every batch size
    write_outputs(doc, args.out, png=args.plot)
    print(render_markdown(doc))
    print(
        f"wrote {os.path.join(args.out, JSON_NAME)}, {MD_NAME}" + (f", {PNG_NAME}" if args.plot else ""),
        file=sys.stderr,
    )
    return doc


if __name__ == "__main__":
    main()
