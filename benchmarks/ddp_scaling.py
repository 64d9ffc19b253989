"""Time one benchmark configuration trained by 1 process and by N data-parallel processes (torchrun, DDP).

python -m benchmarks.ddp_scaling                         # digits, batch 960, rll + contrastive, 1 vs 2 CPU processes
python -m benchmarks.ddp_scaling --processes 1,2,4 --out docs/results/ddp_scaling

Each process count runs ``python -m benchmarks.run`` (through ``torch.distributed.run`` when N > 1) on the same
configuration, paired seeds and global batches, into its own folder, then the training time per iteration (the
runner's ``seconds_per_iteration``, evaluations excluded) and the final MAP@R are read back from ``results.jsonl``
and written, with the machine and the load average before and after, to ``ddp_scaling.md`` and ``.json``. With
``--repeats`` each timing is repeated (fresh output folders) and the median kept.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from typing import Any

from .core.common import atomic_write, cpu_name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def run_once(nproc: int, runner_args: list[str], out: str, threads: int) -> list[dict[str, Any]]:
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(_free_port())]
    cmd += ["-m", f"{__package__ or 'benchmarks'}.run", "--out", out, "--threads", str(threads)] + runner_args
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    with open(os.path.join(out, "results.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> int:
    from .run import ArgumentParser  # one-line errors naming the closest choice

    p = ArgumentParser(
        prog=f"python -m {__package__ or 'benchmarks'}.ddp_scaling", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--processes", default="1,2", help="comma list of process counts (default 1,2)")
    p.add_argument("--losses", default="rll,contrastive")
    p.add_argument("--batch-size", type=int, default=960)
    p.add_argument("--m-per-class", type=int, default=96)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--iterations-per-epoch", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--repeats", type=int, default=2, help="timings per process count; the median is reported")
    p.add_argument("--out", default=os.path.join("docs", "results", "ddp_scaling"))
    p.add_argument("extra", nargs="*", help="more arguments for benchmarks.run, after --")
    args = p.parse_args(argv)
    runner_args = [
        "--losses",
        args.losses,
        "--seeds",
        "1",
        "--batch-size",
        str(args.batch_size),
        "--m-per-class",
        str(args.m_per_class),
        "--epochs",
        str(args.epochs),
        "--iterations-per-epoch",
        str(args.iterations_per_epoch),
        "--eval-every",
        "0",
    ] + args.extra
    try:
        counts = [int(n) for n in args.processes.split(",")]
    except ValueError:
        p.error(f"--processes {args.processes!r}: expected a comma list of process counts, e.g. 1,2")
    if any(n < 1 for n in counts):
        p.error(f"--processes {args.processes!r}: process counts must be >= 1")
    load_before = _loadavg()
    rows: list[dict[str, Any]] = []
    for n in counts:
        timings: dict[str, list[float]] = {}
        metrics: dict[str, float] = {}
        for _ in range(args.repeats):
            out = tempfile.mkdtemp(prefix=f"ddp_scaling_{n}_")
            try:
                for r in run_once(n, runner_args, out, args.threads):
                    timings.setdefault(r["loss"], []).append(r["seconds_per_iteration"])
                    metrics[r["loss"]] = r["metrics"]["mean_average_precision_at_r"]
                    assert r.get("world_size", 1) == n
            finally:
                shutil.rmtree(out, ignore_errors=True)
        for loss, ts in timings.items():
            rows.append({"processes": n, "loss": loss, "s_per_iter": statistics.median(ts), "map_at_r": metrics[loss]})
            print(f"{n} process(es), {loss}: {statistics.median(ts) * 1000:.1f} ms/iter, MAP@R {metrics[loss]:.4f}")
    load_after = _loadavg()
    machine = f"{cpu_name()}, {os.cpu_count()} logical CPUs, {args.threads} torch thread(s) per process"
    base = {r["loss"]: r["s_per_iter"] for r in rows if r["processes"] == counts[0]}
    lines = [
        "# Data-parallel training: 1 vs N processes",
        "",
        f"Machine: {machine}. Load average (1, 5, 15 min) before: {load_before}; after: {load_after}.",
        "",
        f"Runner arguments: `{' '.join(runner_args)}`; median of {args.repeats} timing(s).",
        "",
        "| processes | loss | ms / iteration | speed-up | final MAP@R |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        speed = base[r["loss"]] / r["s_per_iter"]
        lines.append(
            f"| {r['processes']} | {r['loss']} | {r['s_per_iter'] * 1000:.1f} | {speed:.2f}x | {r['map_at_r']:.4f} |"
        )
    os.makedirs(args.out, exist_ok=True)
    atomic_write(os.path.join(args.out, "ddp_scaling.md"), "\n".join(lines) + "\n")
    payload = {"machine": machine, "load_before": load_before, "load_after": load_after, "rows": rows}
    atomic_write(os.path.join(args.out, "ddp_scaling.json"), json.dumps(payload, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
