"""Evaluation at scale: time, peak memory and accuracy of the runner's kNN evaluation on synthetic embeddings.

    python -m benchmarks.eval_scale                                  # 10k, 100k, 300k and 1M items (tens of minutes)
    python -m benchmarks.eval_scale --sizes 10000,100000 --out /tmp/scale.md

The embeddings are clustered and 128-d: classes of 5 to 20 items (uniform), class centres drawn on the unit
sphere, each item its centre plus Gaussian noise (``--noise``), L2-normalised, all drawn from a fixed seed. Every
item is a query against all the others (itself excluded), the protocol of the runner's test split.

Each (size, method) runs in a fresh process, so that its peak resident memory (``ru_maxrss``) is its own; the
table gives it, and what it adds to the embeddings held before the evaluation starts. Methods:

* ``pml-default``: PML's ``AccuracyCalculator()`` with every default (k = the whole reference set, faiss flat
  search, every metric including the clustering ones). Run where its n x n neighbour tables fit in memory; above
  that the table says what they would need.
* ``exact``, ``faiss-flat``, ``faiss-ivf``, ``faiss-hnsw``: :class:`benchmarks.results.knn.ScalableKNN` plus the chunked
  metrics of :func:`benchmarks.results.knn.retrieval_metrics` (k as the metrics need). A method may carry index settings
  as the runner's ``--knn`` does (``faiss-hnsw:m=16,ef_construction=40,ef_search=64``); give such specs as
  separate arguments of ``--methods``. Up to ``--full-exact`` items every method searches every query; above it
  they search the same fixed random sample of ``--sample`` queries (against every reference), where the
  approximate indexes are compared with exact search (paired: the same queries). ``--approx-all`` makes the
  approximate indexes search every query at every size.

For the approximate indexes the row gives the build, calibration and search times apart, and the time that
searching every query would take (build + calibration + search time scaled from the queries searched to all n).

The figures depend on the machine (the table says which) and, on a shared machine, on its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time

import numpy as np
import torch

DIM = 128
METHODS = ("pml-default", "exact", "faiss-flat", "faiss-ivf", "faiss-hnsw")
#: the approximate indexes' settings before they were calibrated (rows measured without a "knn" spec)
FORMER_DEFAULTS = {
    "faiss-ivf": "faiss-ivf:nlist=auto,nprobe=16",
    "faiss-hnsw": "faiss-hnsw:m=16,ef_construction=40,ef_search=64",
}
PML_DEFAULT_MAX_BYTES = 4 << 30  # run PML's defaults only where its n x n tables stay below this


def synthetic(n: int, noise: float, seed: int = 0, dim: int = DIM) -> tuple[torch.Tensor, np.ndarray]:
    """(n x dim float32 unit-norm embeddings, int64 labels): classes of 5-20 items around random centres."""
    rng = np.random.RandomState(seed)
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(int(rng.randint(5, 21)))
    sizes[-1] -= sum(sizes) - n
    labels = np.repeat(np.arange(len(sizes)), sizes)
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(len(sizes), dim, generator=g), dim=1)
    x = torch.empty(n, dim)
    step = 1 << 16
    for s in range(0, n, step):
        lab = torch.from_numpy(labels[s : s + step])
        chunk = centres[lab] + noise / dim**0.5 * torch.randn(len(lab), dim, generator=g)
        x[s : s + step] = torch.nn.functional.normalize(chunk, dim=1)
    return x, labels


def sample_rows(n: int, m: int, seed: int = 1) -> np.ndarray:
    return np.sort(np.random.RandomState(seed).choice(n, min(n, m), replace=False))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def pml_default_bytes(n: int) -> int:
    """What PML's default k (the whole reference set) needs at least: the n x n distance (float32) and index (int64)
    tables, and the n x n label table it makes from them (float32)."""
    return n * n * (4 + 8 + 4)


def worker(spec: dict) -> dict:
    """One (size, method) measurement in this process; returns the row's figures."""
    from benchmarks.results.knn import ScalableKNN, canonical_knn, evaluate_embeddings, parse_knn, summarize_per_query

    torch.set_num_threads(spec["threads"])
    n = spec["n"]
    method = spec["method"] if spec["method"] == "pml-default" else parse_knn(spec["method"])[0]
    x, labels = synthetic(n, spec["noise"])
    sample = sample_rows(n, spec["sample"])
    base = _rss_mb()
    t0 = time.perf_counter()
    out: dict = {"n": n, "method": method, "classes": int(labels.max()) + 1}
    if method in ("faiss-ivf", "faiss-hnsw"):
        out["knn"] = canonical_knn(spec["method"])
    if method == "pml-default":
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        acc = AccuracyCalculator(device=torch.device("cpu")).get_accuracy(x, torch.from_numpy(labels))
        out.update(queries=n, metrics={k: float(v) for k, v in acc.items()}, index="FaissKNN (IndexFlatL2), k = n")
    else:
        knn = ScalableKNN.from_spec(spec["method"])
        approximate = method in ("faiss-ivf", "faiss-hnsw")
        if n > spec["full_exact"] and not (approximate and spec.get("approx_all")):
            rest = np.setdiff1d(np.arange(n), sample)
            order = torch.from_numpy(np.concatenate([sample, rest]))
            xs, ls = x[order], labels[order.numpy()]
            del x
            per_query, _ = evaluate_embeddings(xs, ls, knn, queries=len(sample))
            out.update(
                queries=len(sample), metrics=summarize_per_query(per_query), sample=summarize_per_query(per_query)
            )
        else:
            per_query, _ = evaluate_embeddings(x, labels, knn)
            out.update(queries=n, metrics=summarize_per_query(per_query), sample=summarize_per_query(per_query, sample))
        out["index"] = knn.last_index
        out["timings"] = {k: round(v, 2) for k, v in knn.last_timings.items()}
        if approximate:
            out.update(width=knn.last_width, calibration_recall=knn.last_recall)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["peak_rss_mb"] = round(_rss_mb(), 1)
    out["before_mb"] = round(base, 1)
    return out


def run_one(spec: dict) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.eval_scale", "--worker", json.dumps(spec)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"n": spec["n"], "method": spec["method"].partition(":")[0], "error": f"exit {p.returncode}: {tail[0]}"}
    return dict(json.loads(p.stdout.strip().splitlines()[-1]))


def _pct(v: float | None) -> str:
    return "" if v is None or v != v else f"{100 * v:.2f}"


def settings_label(r: dict) -> str:
    """The index settings of an approximate row, with the calibrated width: ``m=32, ..., ef_search=auto: 256``."""
    if r["method"] not in FORMER_DEFAULTS:
        return ""
    spec = r.get("knn") or FORMER_DEFAULTS[r["method"]]
    text = spec.partition(":")[2].replace(",", ", ")
    lists = re.search(r"nlist=(\d+)", r.get("index", ""))
    if lists and "nlist=auto" in text:
        text = text.replace("nlist=auto", f"nlist=auto: {lists.group(1)}")
    if r.get("width") is not None and r.get("calibration_recall") is not None:
        name = "ef_search" if r["method"] == "faiss-hnsw" else "nprobe"
        text = text.replace(f"{name}=auto", f"{name}=auto: {r['width']} (recall {r['calibration_recall']:.3f})")
    return text + ("" if r.get("knn") else " (former default)")


def _seconds(r: dict) -> tuple[str, str]:
    """("build + calibration + search", "every query, estimated") for rows that time them apart."""
    t = r.get("timings")
    if r["method"] not in FORMER_DEFAULTS:
        return "", ""
    if not t:  # measured before the times were taken apart: every query was searched
        return "", f"{r['seconds']:,.0f}" if r["queries"] == r["n"] else ""
    parts = f"{t['build']:.1f} + {t['calibrate']:.1f} + {t['search']:.1f}"
    every = t["build"] + t["calibrate"] + t["search"] * r["n"] / r["queries"]
    return parts, f"{every:,.0f}" + ("" if r["queries"] == r["n"] else " (est.)")


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "| items | classes | method | index settings | queries | time (s) | build + calibration + search (s) | "
        "every query (s) | peak RSS (MiB) | added (MiB) | MAP@R | R@1 | MAP@R on sample | R@1 on sample | "
        "Δ MAP@R vs exact | Δ R@1 vs exact |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    exact: dict[int, dict] = {}  # the paired reference: an exact search of the same sample queries
    for r in rows:
        if r["method"] in ("faiss-flat", "exact") and "sample" in r:
            exact.setdefault(r["n"], r)
    for r in rows:
        if "error" in r or "skipped" in r:
            why = r.get("error") or r["skipped"]
            lines.append(f"| {r['n']:,} | | {r['method']} | {settings_label(r)} | | not run: {why} |" + " |" * 10)
            continue
        m, s = r["metrics"], r.get("sample", {})
        ex = exact.get(r["n"], {}).get("sample")
        dm = dr = ""
        if ex and s and r["method"] not in ("exact", "faiss-flat"):
            dm = f"{100 * (s['mean_average_precision_at_r'] - ex['mean_average_precision_at_r']):+.2f}"
            dr = f"{100 * (s['recall_at_1'] - ex['recall_at_1']):+.2f}"
        r1 = m.get("recall_at_1", m.get("precision_at_1"))
        parts, every = _seconds(r)
        lines.append(
            f"| {r['n']:,} | {r['classes']:,} | {r['method']} | {settings_label(r)} | {r['queries']:,} | "
            f"{r['seconds']:.1f} | {parts} | {every} | {r['peak_rss_mb']:.0f} | "
            f"{r['peak_rss_mb'] - r['before_mb']:.0f} | "
            f"{_pct(m.get('mean_average_precision_at_r'))} | {_pct(r1)} | "
            f"{_pct(s.get('mean_average_precision_at_r'))} | {_pct(s.get('recall_at_1'))} | {dm} | {dr} |"
        )
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.eval_scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sizes", default="10000,100000,300000,1000000", help="comma list of item counts")
    p.add_argument(
        "--methods",
        nargs="+",
        default=[",".join(METHODS)],
        help=f"comma list of {METHODS}; an index with settings as a separate argument, e.g. faiss-hnsw:ef_search=512",
    )
    p.add_argument("--noise", type=float, default=1.2, help="noise norm relative to the class centre (1.2)")
    p.add_argument("--sample", type=int, default=10000, help="queries of the exact searches above --full-exact")
    p.add_argument("--full-exact", type=int, default=10000, help="largest size searched exactly for every query")
    p.add_argument("--approx-all", action="store_true", help="approximate indexes search every query at every size")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=None, help="markdown table to write (default: print only)")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument(
        "--from-json",
        nargs="+",
        default=None,
        metavar="FILE",
        help="print (and --out) one table of the rows of these --json files, in size and method order; no run",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Measure the evaluation's time and memory at each size and method (or tabulate earlier --json files)."""
    p = _parser()
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return 0
    if a.from_json:
        return _from_json(a.from_json, a.out)
    try:
        sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes {a.sizes!r}: expected a comma list of integers")
    from benchmarks.results.knn import canonical_knn

    methods: list[str] = []
    for token in a.methods:  # "exact,faiss-flat" or one spec with settings, "faiss-hnsw:m=48,ef_search=512"
        methods += [token.strip()] if ":" in token else [m.strip() for m in token.split(",") if m.strip()]
    bad = [m for m in methods if m.partition(":")[0] not in METHODS]
    if bad or not methods:
        p.error(f"--methods: unknown {bad}; choose from {METHODS}")
    for m in methods:
        if m != "pml-default":
            try:
                canonical_knn(m)
            except ValueError as e:
                p.error(f"--methods {m}: {e}")
    if any(s < 100 for s in sizes) or a.sample < 1 or a.noise <= 0:
        p.error("--sizes must be >= 100 each, --sample >= 1, --noise > 0")
    threads = a.threads or torch.get_num_threads()
    from benchmarks.core.common import cpu_name

    meta = {
        "machine": f"{cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {threads} threads",
        "python": platform.python_version(),
        "noise": a.noise,
        "sample": a.sample,
        "full_exact": a.full_exact,
        "approx_all": a.approx_all,
        "command": "python -m benchmarks.eval_scale " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    rows = _measure(a, [(n, m) for n in sizes for m in methods], meta, threads=threads)
    print(f"Machine: {meta['machine']}.\n")
    print(markdown(rows, meta))
    return 0


def _from_json(paths: list[str], out: str | None) -> int:
    """Print (and write to ``out``) one table of the rows of earlier ``--json`` files, in size and method order."""
    rows: list[dict] = []
    metas = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        rows += data["rows"]
        metas.append(data["meta"])
    rows.sort(key=lambda r: (r["n"], METHODS.index(r["method"]), bool(r.get("knn")), r.get("knn", "")))
    text = markdown(rows, metas[0])
    if out:
        from benchmarks.core.common import atomic_write

        atomic_write(out, text)
    for m in metas:
        print(f"{m['command']}: {m['machine']}")
    print(text)
    return 0


def _measure(a: argparse.Namespace, jobs: list[tuple[int, str]], meta: dict, *, threads: int) -> list[dict]:
    """One row per (size, method), each in its own process; the tables are rewritten after every row."""
    from tqdm import tqdm

    rows: list[dict] = []
    for n, m in tqdm(jobs, desc="evaluations", file=sys.stderr):
        if m == "pml-default" and pml_default_bytes(n) > PML_DEFAULT_MAX_BYTES:
            gib = pml_default_bytes(n) / 2**30
            rows.append({"n": n, "method": m, "skipped": f"k = n needs n x n tables, >= {gib:,.0f} GiB"})
        else:
            spec = dict(
                n=n,
                method=m,
                noise=a.noise,
                sample=a.sample,
                full_exact=a.full_exact,
                threads=threads,
                approx_all=a.approx_all,
            )
            rows.append(run_one(spec))
        tqdm.write(json.dumps(rows[-1]), file=sys.stderr)
        text = markdown(rows, meta)
        if a.out:
            from benchmarks.core.common import atomic_write

            atomic_write(a.out, text)
        if a.json:
            from benchmarks.core.common import atomic_write

            atomic_write(a.json, json.dumps({"meta": meta, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    sys.exit(main())
