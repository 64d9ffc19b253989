"""Fault injection: two runners share one store while one of them is killed (SIGKILL) or interrupted (SIGTERM) at a
random moment, 20 times in a row, and restarted each time. Afterwards the store and the exports hold every run of
the command exactly once, and nothing else; every export written on the way holds finished runs only, once each."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

from benchmarks.results import report
from benchmarks.results.store import RUNS, ResultStore

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOSSES = ("triplet", "contrastive", "ntxent")
SEEDS = 3
INJECTIONS = 20


def _store_rows(out) -> list[dict]:
    store = ResultStore("sqlite:///" + os.path.join(str(out), "results.db"))
    with store.engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(RUNS.select()).mappings()]
    store.close()
    return rows


def _check_export(out, done_keys: set[tuple[str, int]] | None = None) -> list[tuple[str, int]]:
    """The (loss, seed) pairs of results.jsonl: each once, each finished in the store."""
    path = os.path.join(str(out), "results.jsonl")
    if not os.path.exists(path):
        return []
    pairs = [(r["loss"], r["seed"]) for r in report.load_jsonl(path)]
    assert len(pairs) == len(set(pairs)), f"duplicated in the export: {pairs}"
    rows = _store_rows(out)
    finished = {(json.loads(r["record"])["loss"], r["seed"]) for r in rows if r["status"] == "done"}
    assert set(pairs) <= finished, f"exported but not finished: {set(pairs) - finished}"
    return pairs


def test_random_kills_and_interrupts_of_two_runners_lose_and_duplicate_nothing(tmp_path):
    rng = random.Random(19)
    out = tmp_path / "shared"
    cmd = [sys.executable, "-m", "benchmarks.run", "--out", str(out), "--losses", ",".join(LOSSES)]
    cmd += ["--seeds", str(SEEDS), "--epochs", "1", "--iterations-per-epoch", "4", "--eval-every", "0"]

    def start() -> subprocess.Popen:
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    procs = [start(), start()]
    kinds = []
    try:
        for i in range(INJECTIONS):
            time.sleep(rng.uniform(0.3, 6.0))  # from the imports to the exports: any moment
            k = i % 2
            sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
            p = procs[k]
            if p.poll() is None:
                os.kill(p.pid, sig)
            _, err = p.communicate(timeout=120)
            allowed = {0, -signal.SIGKILL} if sig == signal.SIGKILL else {0, 130, -signal.SIGTERM}
            assert p.returncode in allowed, (sig, p.returncode, err[-3000:])
            kinds.append((sig.name, p.returncode))
            _check_export(out)
            procs[k] = start()
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], [e[-3000:] for _, e in results]
    assert {s for s, _ in kinds} == {"SIGKILL", "SIGTERM"}
    rows = _store_rows(out)
    assert {r["status"] for r in rows} == {"done"}
    pairs = sorted((json.loads(r["record"])["loss"], r["seed"]) for r in rows)
    assert pairs == sorted((n, s) for n in LOSSES for s in range(SEEDS))  # every run once, nothing else
    assert sorted(_check_export(out)) == pairs
