"""The command line of the loss speed benchmark: the sweep over batch sizes, resuming, and the argument parser."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import torch

from ..core.common import device_name, resolve_device
from .cases import (
    CASES,
    DEPRECATED_NAMES,
    INPUT_KINDS,
    SAMPLES_PER_CLASS,
    Step,
    Unavailable,
    Workload,
    current_name,
    make_input,
    make_labels,
    ratio_specs,
    with_current_names,
)
from .measure import measure_memory_here, measure_memory_subprocess, timed_step
from .render import JSON_NAME, MD_NAME, PNG_NAME, render_markdown, write_outputs

PROG = f"python -m {__package__ or 'benchmarks.loss_speed'}"  # how the command was started (pml-rll-speed: cli())
DEFAULT_BATCH_SIZES = (128, 256, 512, 1024, 2048, 4096)


def _entry(results: dict[str, Any], name: str, batch_size: int) -> dict[str, Any]:
    entry: dict[str, Any] = results.setdefault(name, {}).setdefault(str(batch_size), {})
    return entry


def _versions() -> tuple[str, str]:
    import pytorch_metric_learning

    return torch.__version__, pytorch_metric_learning.__version__


# Fields that must agree for --resume to reuse earlier results.
_RESUME_KEYS = (
    "dim",
    "repeats",
    "warmup",
    "torch_num_threads",
    "device",
    "seed",
    "memory",
    "losses",
    "inputs",
    "ref_size",
    "compile",
)


@dataclasses.dataclass
class Sweep:
    """One run of the benchmark: its arguments, workload, device, results so far and progress bar."""

    args: argparse.Namespace
    workload: Workload
    device: torch.device
    results: dict[str, Any]
    bar: Any


def time_batch(names: list[str], batch_size: int, sweep: Sweep, too_slow: dict[str, str]) -> None:
    """Warm-up then interleaved repeats of every runnable loss at one batch size."""
    args, workload, device, results, bar = sweep.args, sweep.workload, sweep.device, sweep.results, sweep.bar
    runnable: dict[str, tuple[Step, list[torch.nn.Module], torch.Tensor]] = {}
    labels = make_labels(batch_size, device)
    for n in names:
        spec, e = CASES[n], _entry(results, n, batch_size)
        if spec.max_batch is not None and batch_size > spec.max_batch:
            e.update(time_status="skipped", time_reason=f"{spec.max_batch_reason}; max B {spec.max_batch}", capped=True)
        elif n in too_slow:
            e.update(time_status="skipped", time_reason=too_slow[n])
        else:
            try:
                step, modules = spec.build(batch_size, workload, device)
            except Unavailable as exc:
                e.update(time_status="unavailable", time_reason=exc.short, detail=exc.detail)
            else:
                if args.compile:  # compiled on the first warm-up step (which the timing excludes)
                    step = torch.compile(step)
                runnable[n] = (step, modules, make_input(spec, batch_size, workload, device))
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


def memory_batch(names: list[str], batch_size: int, sweep: Sweep) -> None:
    """Peak memory of every loss at one batch size (CPU: each in a fresh process)."""
    args, workload, device, results, bar = sweep.args, sweep.workload, sweep.device, sweep.results, sweep.bar
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
                m = measure_memory_subprocess(n, batch_size, workload, args.threads, args.memory_timeout_s)
            else:
                try:
                    m = measure_memory_here(n, batch_size, workload, device)
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


def _add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    """What is measured: batch sizes, width, repeats, warm-up, threads, device, losses."""
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
        default=list(CASES),
        metavar="NAME",
        help="subset of losses by registry name (default: all)",
    )


def _add_limit_and_input_arguments(p: argparse.ArgumentParser) -> None:
    """Memory measurements, the time limit of a step, and the inputs (seed, kind, reference set)."""
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
        "--ref-size",
        type=int,
        default=0,
        metavar="M",
        help="cross-batch memory mode: compare the B queries with a fixed reference set of M items (ref_emb, "
        "ref_labels; drawn like the inputs, no gradient) instead of the batch; losses that take no reference set "
        "are reported unavailable (default: 0, off)",
    )


def _add_output_arguments(p: argparse.ArgumentParser) -> None:
    """Outputs, resuming, torch.compile, the figure and the progress bar."""
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
    p.add_argument(
        "--compile",
        action="store_true",
        help="time each loss under torch.compile (default backend; compiled during the warm-up steps, which must "
        "then be at least 1; the memory measurements stay uncompiled)",
    )
    p.add_argument("--no-plot", dest="plot", action="store_false", help="do not write the PNG")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.add_argument("--memory-worker", metavar="NAME", default=None, help=argparse.SUPPRESS)


def _checked_losses(p: argparse.ArgumentParser, names: list[str]) -> list[str]:
    """``--losses`` under the names of :data:`CASES` (an earlier release's name translated, with a note), once
    each, in the order given; an unknown name is an error."""
    old = [n for n in names if n in DEPRECATED_NAMES]
    if old:
        renamed = ", ".join(f"{n} -> {current_name(n)}" for n in old)
        print(f"note: --losses: renamed cases ({renamed}); the old names will stop working", file=sys.stderr)
    names = [current_name(n) for n in names]
    bad = [n for n in names if n not in CASES]
    if bad:
        p.error(f"--losses: unknown {bad}; known: {list(CASES)}")
    return list(dict.fromkeys(names))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from ..run import ArgumentParser  # one-line errors naming the closest choice

    p = ArgumentParser(
        prog=PROG,
        description="Forward+backward time and peak memory of metric-learning losses against batch size.",
        epilog="Losses: " + ", ".join(f"{n} ({s.label})" for n, s in CASES.items()),
    )
    _add_sweep_arguments(p)
    _add_limit_and_input_arguments(p)
    _add_output_arguments(p)
    args = p.parse_args(argv)
    args.losses = _checked_losses(p, args.losses)
    if args.memory_worker is not None:
        args.memory_worker = current_name(args.memory_worker)
    for b in args.batch_sizes + (args.memory_batch_sizes or []):
        if b < 8 or b % SAMPLES_PER_CLASS:
            p.error(f"batch size {b}: must be a multiple of {SAMPLES_PER_CLASS} and at least 8")
    if args.compile and args.warmup < 1:
        p.error("--compile needs --warmup of at least 1 (the compilation happens there)")
    if args.dim < 1 or args.repeats < 1 or args.warmup < 0 or args.threads < 1 or args.ref_size < 0:
        p.error("--dim, --repeats and --threads must be positive, --warmup and --ref-size non-negative")
    args.batch_sizes = sorted(set(args.batch_sizes))
    return args


def _config(args: argparse.Namespace, device: torch.device, argv: Sequence[str] | None) -> dict[str, Any]:
    """The run's settings, versions and command: the ``config`` of ``loss_speed.json``."""
    torch_v, pml_v = _versions()
    return {
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
        "ref_size": args.ref_size,
        "compile": args.compile,
        "memory": args.memory,
        "losses": args.losses,
        "memory_batch_sizes": args.memory_batch_sizes,
        "max_step_s": args.max_step_s,
        "torch_version": torch_v,
        "pml_version": pml_v,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command": PROG + " " + " ".join(sys.argv[1:] if argv is None else list(argv)),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def _resumed(args: argparse.Namespace, cfg: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    """``(results, done batch sizes)`` taken from ``OUT/loss_speed.json`` with ``--resume`` when its settings
    agree (a file of an earlier release is read under today's case names); else nothing."""
    json_path = os.path.join(args.out, JSON_NAME)
    if not (args.resume and os.path.exists(json_path)):
        return {}, []
    with open(json_path) as f:
        old = with_current_names(json.load(f))
    if not all(old["config"].get(k) == cfg[k] for k in _RESUME_KEYS):
        print(f"not resuming: settings differ from {json_path}", file=sys.stderr)
        return {}, []
    done = [b for b in old.get("done_batch_sizes", []) if b in args.batch_sizes]
    results = {
        n: {str(b): e for b, e in per.items() if int(b) in done}
        for n, per in old["results"].items()
        if n in args.losses
    }
    print(f"resuming: batch sizes {done} taken from {json_path}", file=sys.stderr)
    return results, done


def _too_slow(args: argparse.Namespace, results: dict[str, Any], done: list[int]) -> dict[str, str]:
    """The losses skipped for slowness (or failure) at a resumed batch size: skipped at the larger ones too."""
    too_slow: dict[str, str] = {}
    for n in args.losses:
        for b in done:
            e = results.get(n, {}).get(str(b), {})
            if e.get("time_status") in ("skipped", "failed") and "B=" in e.get("time_reason", ""):
                too_slow[n] = e["time_reason"]
    return too_slow


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    workload = Workload(args.dim, args.inputs, args.ref_size, args.seed)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    if args.memory_worker is not None:  # internal: one memory measurement in this fresh process
        print(json.dumps(measure_memory_here(args.memory_worker, args.batch_sizes[0], workload, device)))
        return {}

    from ..core.progress import progress_bar

    cfg = _config(args, device, argv)
    results, done = _resumed(args, cfg)
    doc = {"config": cfg, "results": results, "done_batch_sizes": done}
    specs = ratio_specs(workload)

    todo = [b for b in args.batch_sizes if b not in done]
    too_slow = _too_slow(args, results, done)  # carried over from resumed batch sizes
    total = len(todo) * len(args.losses) * (args.warmup + args.repeats + (1 if args.memory else 0))
    with progress_bar(
        total=total, desc="loss_speed", unit="step", disable=not args.progress, dynamic_ncols=True
    ) as bar:
        for b in todo:
            bar.set_postfix_str(f"timing B={b}")
            sweep = Sweep(args, workload, device, results, bar)
            time_batch(args.losses, b, sweep, too_slow)
            if args.memory:
                memory_batch(args.losses, b, sweep)
            done.append(b)
            write_outputs(doc, args.out, png=False, specs=specs)  # checkpoint after every batch size
    write_outputs(doc, args.out, png=args.plot, specs=specs)
    print(render_markdown(doc))
    print(
        f"wrote {os.path.join(args.out, JSON_NAME)}, {MD_NAME}" + (f", {PNG_NAME}" if args.plot else ""),
        file=sys.stderr,
    )
    return doc


def cli() -> None:
    """The ``pml-rll-speed`` console command (installed with the package): the same as ``python -m``."""
    global PROG
    PROG = "pml-rll-speed"
    main()
