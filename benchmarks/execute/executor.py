"""Where benchmark work runs: in the main process or in worker processes that end with it, fed by one scheduler.

A *task* is one training run (a loss, its hyper-parameters, a seed, and either the test split or a tuning fold).
``execute`` runs a task in any process, loading the dataset once per process. ``WorkerPool`` runs tasks inline
(``--jobs 1``) or in spawned worker processes; a worker exits as soon as its parent process is gone (a killed
runner leaves no workers behind). ``schedule`` keeps the workers busy with the tasks that *sources* hand out
(a source claims its work in the results store before handing it out) and returns each result to its source.

A task runs under its claim: it checks now and then (at most every few seconds, at iteration ends) that the claim
is still its own, and raises :class:`benchmarks.results.store.ClaimLostError` as soon as it is not. A worker process
that dies breaks the whole process pool: the pool is started again, and the tasks it was running are run again one at
a time, so that only the task that kills its worker fails (``BrokenProcessPool`` handed to its source).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from . import distributed

_BUNDLES: dict[tuple[Any, ...], Any] = {}
_FOLD_BUNDLES: dict[tuple[Any, ...], Any] = {}


def _bundle(job: dict[str, Any]) -> Any:
    from ..data.load import load_dataset

    key = (
        job["dataset"],
        job["data_root"],
        job["image_size"],
        tuple(job["test_alphabets"] or ()),
        job.get("test_classes"),
    )
    if key not in _BUNDLES:
        _BUNDLES[key] = load_dataset(
            job["dataset"],
            job["data_root"],
            job["download"],
            job["image_size"],
            job["test_alphabets"],
            job.get("test_classes"),
        )
    return _BUNDLES[key]


def preload(job: dict[str, Any], bundle: Any) -> None:
    """Make the main process's already loaded bundle the one that inline tasks use."""
    key = (job["dataset"], job["data_root"], job["image_size"], tuple(job["test_alphabets"] or ()))
    _BUNDLES[key + (job.get("test_classes"),)] = bundle


def execute(job: dict[str, Any], task: dict[str, Any]) -> dict[str, Any]:
    """Run one task (see the module docstring) and return its result record. Starts from empty per-run logs."""
    import torch

    from ..data.folds import fold_bundle
    from .pipeline import run_one

    for p in job.get("sys_path", ()):
        if p not in sys.path:
            sys.path.append(p)  # last: a module beside the config never shadows an installed one
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    bundle = _bundle(job)
    cfg = job["cfg"]
    if task.get("fold") is not None:
        bundle.test_sealed = True  # tuning: reading the test split raises
        fkey = (id(bundle), task["fold"], repr(task["folds"]))
        if fkey not in _FOLD_BUNDLES:
            _FOLD_BUNDLES[fkey] = fold_bundle(bundle, task["folds"], task["fold"])
        data = _FOLD_BUNDLES[fkey]  # --eval-every draws the held-out fold's curve (benchmarks/results/convergence.py)
    else:
        bundle.test_sealed = False
        data = bundle
    should_stop = _claim_check(job, task)
    if distributed.current().is_main:  # under torchrun only rank 0 writes logs (the others train in step)
        if should_stop is not None:
            should_stop()
        shutil.rmtree(task["log_dir"], ignore_errors=True)  # the claim's own folder: a restarted run starts clean
    t0 = time.perf_counter()
    rec = run_one(
        data,
        task["entry"],
        task["hparams"],
        task["seed"],
        cfg,
        torch.device(job["device"]),
        task["log_dir"],
        num_workers=job["workers"],
        tensorboard=job["tensorboard"] and task.get("fold") is None,
        save_models=job["save_models"] and task.get("fold") is None,
        pbar_position=task.get("pbar_position"),
        should_stop=should_stop,
    )
    rec["wall_seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def _claim_check(job: dict[str, Any], task: dict[str, Any]) -> Callable[[], None] | None:
    """A callable that raises ClaimLostError once the task's claim belongs to another runner (it asks the store
    at most every ``min(lease / 4, 5)`` seconds); None without a claim or under torchrun (the ranks train in step)."""
    from ..results.store import ClaimLostError, claim_lost

    claim, url = task.get("claim"), job.get("storage")
    if not claim or not url or claim[2] is None or distributed.current().is_distributed:
        return None
    key, seed, token = claim
    every = min(max(0.5, float(job.get("lease", 120.0)) / 4), 5.0)
    last = [-float("inf")]  # the first call asks

    def check() -> None:
        now = time.monotonic()
        if now - last[0] < every:
            return
        last[0] = now
        if claim_lost(url, key, seed, token):
            raise ClaimLostError(f"run {key} seed {seed}: another runner took the claim over")

    return check


def _watch_parent(parent: int) -> None:
    """Worker initializer: exit when the parent process is gone (Linux: also ask the kernel to kill us with it)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    if os.getppid() != parent:
        os._exit(1)


class WorkerPool:
    """``jobs`` worker processes (spawned, ending with this process), or inline execution for ``jobs == 1``
    (under torchrun, on rank 0, with every task sent to the other ranks first:
    ``benchmarks.execute.distributed.follow``).
    Args:
        jobs: number of tasks that run at once.
    """

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self._pool: cf.ProcessPoolExecutor | None = None
        if jobs > 1:
            import multiprocessing as mp

            self._pool = cf.ProcessPoolExecutor(
                jobs, mp_context=mp.get_context("spawn"), initializer=_watch_parent, initargs=(os.getpid(),)
            )

    def submit(self, job: dict[str, Any], task: dict[str, Any]) -> cf.Future[Any]:
        if self._pool is not None:
            try:
                return self._pool.submit(execute, job, dict(task, pbar_position=None))
            except cf.process.BrokenProcessPool as e:  # a worker died since the last wait: like a task it broke
                broken: cf.Future[Any] = cf.Future()
                broken.set_exception(e)
                return broken
        fut: cf.Future[Any] = cf.Future()
        distributed.broadcast_task(task)  # under torchrun the other ranks train the same task in step
        try:
            fut.set_result(execute(job, dict(task, pbar_position=1)))
        except Exception as e:  # noqa: BLE001 - handed to the task's source like a worker's exception
            fut.set_exception(e)
        return fut

    @property
    def broken(self) -> bool:
        """Whether a worker process died and took the pool with it."""
        return self._pool is not None and bool(getattr(self._pool, "_broken", False))

    def restart(self) -> None:
        """Replace a broken pool with a new one of the same size."""
        self.shutdown()
        self.__init__(self.jobs)  # type: ignore[misc]

    def shutdown(self) -> None:
        if self._pool is not None:
            procs = list(getattr(self._pool, "_processes", {}).values())
            self._pool.shutdown(wait=False, cancel_futures=True)
            for p in procs:  # interrupted: do not wait for running tasks
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(timeout=10)
            self._pool = None


class Source(Protocol):
    """Hands out tasks (claimed in the store) and receives their results."""

    def next_task(self) -> dict[str, Any] | None: ...

    def on_result(self, task: dict[str, Any], future: cf.Future[Any]) -> None: ...

    @property
    def finished(self) -> bool: ...


def schedule(pool: WorkerPool, job: dict[str, Any], sources: list[Source], poll_seconds: float = 2.0) -> None:
    """Run every source's tasks, ``pool.jobs`` at a time, until every source is finished.

    Sources are asked in turn, so that several losses' tuning trials interleave. When no task is running and a
    source still waits for work another runner holds, the scheduler polls every ``poll_seconds``.
    """
    inflight: dict[cf.Future[Any], tuple[Source, dict[str, Any]]] = {}
    suspects: list[tuple[Source, dict[str, Any]]] = []  # tasks a dying worker interrupted: rerun one at a time
    turn = 0
    while True:
        if suspects and not inflight:
            src, suspect = suspects.pop(0)
            suspect = dict(suspect, alone=True)
            inflight[pool.submit(job, suspect)] = (src, suspect)
        progressed = not suspects and not any(t.get("alone") for _, t in inflight.values())
        while len(inflight) < pool.jobs and progressed:
            progressed = False
            active = [s for s in sources if not s.finished]
            for i in range(len(active)):
                if len(inflight) >= pool.jobs:
                    break
                src = active[(turn + i) % len(active)]
                task = src.next_task()
                if task is not None:
                    fut = pool.submit(job, task)
                    inflight[fut] = (src, task)
                    progressed = True
            turn += 1
        if not inflight:
            if all(s.finished for s in sources):
                return
            time.sleep(poll_seconds)
            continue
        done, _ = cf.wait(list(inflight), timeout=poll_seconds, return_when=cf.FIRST_COMPLETED)
        for fut in done:
            src, task = inflight.pop(fut)
            if not fut.cancelled() and isinstance(fut.exception(), cf.process.BrokenProcessPool):
                if pool.broken:
                    pool.restart()
                if not task.get("alone"):
                    suspects.append((src, task))
                    continue
            src.on_result(task, fut)
