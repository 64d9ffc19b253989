"""How the loss speed benchmark measures: one timed forward+backward step, and the peak memory of one step."""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from .cases import CASES, Step, Unavailable, Workload, make_input, make_labels

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIB = 2.0**20


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clear_grads(emb: torch.Tensor, modules: Sequence[torch.nn.Module]) -> None:
    emb.grad = None
    for m in modules:
        for p in m.parameters():
            p.grad = None


def run_step(step: Step, emb: torch.Tensor, labels: torch.Tensor) -> None:
    loss = step(emb, labels)
    loss.backward()


def timed_step(
    step: Step, emb: torch.Tensor, labels: torch.Tensor, modules: Sequence[torch.nn.Module], device: torch.device
) -> float:
    """One forward+backward, in milliseconds."""
    clear_grads(emb, modules)
    sync(device)
    t0 = time.perf_counter()
    run_step(step, emb, labels)
    sync(device)
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


def measure_memory_here(name: str, batch_size: int, workload: Workload, device: torch.device) -> dict[str, Any]:
    """Peak memory of one step of one loss, in this process (CPU: call it in a fresh process).

    The inputs (and the reference set) are allocated before the baseline: they are not the loss's memory."""
    spec = CASES[name]
    try:
        step, modules = spec.build(batch_size, workload, device)
    except Unavailable as e:
        return {"status": "unavailable", "reason": e.short, "detail": e.detail}
    labels = make_labels(batch_size, device)
    # warm-up on a tiny batch: lazy library initialisation (thread pools, kernels) is not the loss's memory
    small = 8
    small_step, small_modules = spec.build(small, workload, device)
    run_step(small_step, make_input(spec, small, workload, device), make_labels(small, device))
    del small_step, small_modules
    emb = make_input(spec, batch_size, workload, device)
    clear_grads(emb, modules)
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
    hwm = _proc_status_kib("VmHWM") if reset else None
    if hwm is not None:
        peak_kib, method = hwm, "VmHWM after clear_refs reset"
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = "ru_maxrss (peak not resettable: upper bound)"
    return {"status": "ok", "peak_mib": (peak_kib - base_kib) / 1024.0, "method": method}


def measure_memory_subprocess(
    name: str, batch_size: int, workload: Workload, threads: int, timeout_s: float
) -> dict[str, Any]:
    """``measure_memory_here`` in a fresh process (CPU), through the command line's internal worker option."""
    cmd = [
        sys.executable,
        "-m",
        __package__ or "benchmarks.loss_speed",  # pml_rll_bench.loss_speed when installed
        "--memory-worker",
        name,
        "--batch-sizes",
        str(batch_size),
        "--dim",
        str(workload.dim),
        "--threads",
        str(threads),
        "--seed",
        str(workload.seed),
        "--inputs",
        workload.inputs,
        "--ref-size",
        str(workload.ref_size),
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
    out: dict[str, Any] = json.loads(lines[-1])
    return out
