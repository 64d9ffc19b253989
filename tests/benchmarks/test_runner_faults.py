"""What the runner keeps under faults: an interrupted replacement, a failing or dying run, concurrent tuners on a
fresh store, leases of different lengths, a claim taken over from a paused runner, damaged or foreign stores."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
from sqlalchemy.exc import OperationalError

from benchmarks.data import load as datasets
from benchmarks.results import report
from benchmarks.results.store import RUNS, ResultStore
from benchmarks.run import main
from tests.benchmarks.test_runner_store import REPO, TINY, _rows, _runner, _url


@pytest.fixture
def no_data(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("data loaded before the store was checked")

    monkeypatch.setattr(datasets, "load_dataset", refuse)


# ------------------------------------------------------------------------------------------------ --no-resume
def test_a_replacement_given_up_keeps_the_earlier_record(tmp_path):
    a = ResultStore(_url(tmp_path))
    assert a.claim("k", 0, "run", {})[0] == "mine" and a.complete("k", 0, {"v": "old"})
    b = ResultStore(_url(tmp_path), lease_seconds=0.5)
    assert b.claim("k", 0, "run", {}, replace_before=time.time() + 1)[0] == "mine"
    assert a.get("k", 0) == {"v": "old"} and a.records() == [{"v": "old"}]  # stands while being replaced
    assert a.claim("k", 0, "run", {}) == ("done", {"v": "old"})  # a resuming runner reuses it
    assert a.claim("k", 0, "run", {}, replace_before=time.time() + 1) == ("busy", None)  # b works on it
    b.release("k", 0)  # interrupted
    assert a.status("k", 0) == "done" and a.get("k", 0) == {"v": "old"}
    # a replacing runner that dies: the record stands, the next --no-resume takes over and replaces it
    assert b.claim("k", 0, "run", {}, replace_before=time.time() + 1)[0] == "mine"
    b._held.clear()  # b "dies" without releasing
    time.sleep(0.6)
    assert a.get("k", 0) == {"v": "old"}
    assert a.claim("k", 0, "run", {}, replace_before=time.time() + 1)[0] == "mine"
    assert a.complete("k", 0, {"v": "new"}) and a.records() == [{"v": "new"}]
    a.close()
    b.close()


def test_an_interrupted_no_resume_keeps_the_finished_run(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "o")
    args = ["--losses", "contrastive", "--seeds", "1", "--out", out] + TINY
    assert main(args) == 0
    before = report.load_jsonl(os.path.join(out, "results.jsonl"))
    import benchmarks.execute.pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt  # SIGTERM or Ctrl-C in the middle of the new run

    monkeypatch.setattr(benchmarks.execute.pipeline, "run_one", interrupted)
    assert main(args + ["--no-resume", "--epochs", "1"]) == 130
    rows = _rows(out)
    assert [r["status"] for r in rows] == ["done"]
    after = report.load_jsonl(os.path.join(out, "results.jsonl"))
    assert after == before and len(after) == 1


# ------------------------------------------------------------------------------------------------ failures
LOSSES = textwrap.dedent(
    """
    import os
    import signal

    from pytorch_metric_learning.losses import ContrastiveLoss


    class Boom(ContrastiveLoss):
        def forward(self, embeddings, labels, *args, **kwargs):
            if embeddings.requires_grad:  # in training (the runner's check of the options calls it without grad)
                raise RuntimeError("boom in training")
            return super().forward(embeddings, labels, *args, **kwargs)


    class Killer(ContrastiveLoss):
        def forward(self, embeddings, labels, *args, **kwargs):
            if embeddings.requires_grad:
                os.kill(os.getpid(), signal.SIGKILL)
            return super().forward(embeddings, labels, *args, **kwargs)
    """
)
CONFIG = """
[losses.boom]
class = "faulty_losses:Boom"
[losses.killer]
class = "faulty_losses:Killer"
"""


def _config(tmp_path) -> str:
    (tmp_path / "faulty_losses.py").write_text(LOSSES)
    (tmp_path / "faults.toml").write_text(CONFIG)
    return str(tmp_path / "faults.toml")


def test_a_failing_run_is_recorded_and_the_others_are_made_and_exported(tmp_path, capsys):
    out = str(tmp_path / "o")
    args = ["--config", _config(tmp_path), "--losses", "boom,contrastive", "--seeds", "2", "--out", out] + TINY
    assert main(args) == 1
    captured = capsys.readouterr()
    recs = report.load_jsonl(os.path.join(out, "results.jsonl"))
    assert sorted((r["loss"], r["seed"]) for r in recs) == [("contrastive", 0), ("contrastive", 1)]
    assert "2 failed" in captured.err and "boom seed 0: RuntimeError: boom in training" in captured.err
    assert "boom seed 1: RuntimeError: boom in training" in captured.err
    lines = [line for line in captured.err.splitlines() if "boom seed" in line and "(traceback: " in line]
    tracebacks = [line.rsplit("(traceback: ", 1)[1].rstrip(")") for line in lines]
    assert len(tracebacks) == 2
    for path in tracebacks:
        text = open(path).read()
        assert "Traceback" in text and "boom in training" in text and "faulty_losses.py" in text
    assert {r["status"] for r in _rows(out)} == {"done"} and len(_rows(out)) == 2  # released: nothing half-made
    assert main(args) == 1  # the same command retries the failed runs and reuses the others
    captured = capsys.readouterr()
    assert "0 runs/trials made, 2 reused" in captured.out and "2 failed" in captured.err


def test_a_worker_that_dies_fails_only_its_own_run(tmp_path):
    out = tmp_path / "o"
    cmd = _runner(out, "--config", _config(tmp_path), "--losses", "killer,contrastive,triplet", "--seeds", "1")
    res = subprocess.run(cmd + TINY + ["--jobs", "2"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "1 failed" in res.stderr and "killer seed 0: BrokenProcessPool" in res.stderr
    recs = report.load_jsonl(os.path.join(out, "results.jsonl"))
    assert sorted(r["loss"] for r in recs) == ["contrastive", "triplet"]


# ------------------------------------------------------------------------------------------------ concurrency
OPEN_AT = """
import sys, time
from benchmarks.results.store import ResultStore, open_optuna_storage
url, start = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
ResultStore(url).close()
open_optuna_storage(url)
"""


def test_runners_opening_a_fresh_store_at_once_all_succeed(tmp_path):
    for attempt in range(2):  # two fresh stores, four runners each, all starting at the same instant
        url = _url(tmp_path) + f".{attempt}"
        start = time.time() + 8  # after the imports
        procs = [
            subprocess.Popen([sys.executable, "-c", OPEN_AT, url, str(start)], cwd=REPO, stderr=subprocess.PIPE)
            for _ in range(4)
        ]
        errs = [p.communicate(timeout=120)[1].decode()[-1500:] for p in procs]
        assert [p.returncode for p in procs] == [0] * 4, errs


def test_concurrent_tuning_runners_on_a_fresh_store_all_finish(tmp_path):
    out = tmp_path / "fresh"
    cmd = _runner(out, "--tune", "--trials", "2", "--folds", "2", "--losses", "contrastive", "--seeds", "1", *TINY)
    cmd += ["--batch-size", "16", "--m-per-class", "4"]  # 4 classes a batch: each fold keeps 5 classes
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "abc"]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e[-2000:] for _, e in outs]
    rows = _rows(out)
    assert {r["status"] for r in rows} == {"done"}
    assert sorted(r["kind"] for r in rows if r["kind"] != "fold") == ["run", "run", "trial", "trial"] or sorted(
        r["kind"] for r in rows if r["kind"] != "fold"
    ) == ["run", "trial", "trial"]  # the tuned run may equal the untuned one (one stored run, listed twice)


def test_a_shorter_lease_does_not_take_over_a_live_claim(tmp_path):
    a = ResultStore(_url(tmp_path), lease_seconds=60)
    b = ResultStore(_url(tmp_path), lease_seconds=0.5)
    assert a.claim("k", 0, "run", {})[0] == "mine"
    time.sleep(1.0)  # older than b's lease, well within a's
    assert b.claim("k", 0, "run", {}) == ("busy", None)
    with a.engine.begin() as conn:  # a's heartbeat stops for longer than a's own lease: now it is taken over
        conn.execute(RUNS.update().values(heartbeat=time.time() - 61))
    assert b.claim("k", 0, "run", {})[0] == "mine"
    a.close()
    b.close()


def _snapshot(folder: str) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            out[os.path.relpath(os.path.join(dirpath, f), folder)] = (st.st_size, st.st_mtime_ns)
    return out


def _pause_outside_a_write(pid: int, db) -> None:
    """SIGSTOP a runner at a moment when it holds no SQLite write lock.

    A process stopped inside a write transaction keeps SQLite's lock, and every other runner then finds the store
    locked (an SQLite property, not the runner's); the test is about claims, so it pauses between transactions.
    """
    for _ in range(50):
        os.kill(pid, signal.SIGSTOP)
        con = sqlite3.connect(str(db), timeout=0.5)
        try:
            con.execute("BEGIN IMMEDIATE")
            con.rollback()
            return
        except sqlite3.OperationalError:  # stopped inside a write: let it finish and try again
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.05)
        finally:
            con.close()
    raise AssertionError("the runner held the store's write lock at every try")


def test_a_paused_runner_whose_claim_was_taken_over_writes_nothing(tmp_path):
    out = tmp_path / "o"
    budget = ["--losses", "contrastive", "--seeds", "1", "--epochs", "4", "--iterations-per-epoch", "150"]
    budget += ["--eval-every", "1"]
    a = subprocess.Popen(
        _runner(out, *budget, "--lease", "2"), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline:  # a has claimed the run and started writing its logs
            if os.path.exists(out / "logs") and any("logs" in d for _, d, _ in os.walk(out / "logs")):
                break
            assert a.poll() is None, a.communicate()[1][-2000:]
            time.sleep(0.05)
        _pause_outside_a_write(a.pid, out / "results.db")
        time.sleep(3)  # a's claim (lease 2 s) expires
        b = subprocess.run(_runner(out, *budget), cwd=REPO, capture_output=True, text=True, timeout=600)
        assert b.returncode == 0 and "1 runs/trials made" in b.stdout, b.stderr[-2000:]
        (row,) = _rows(out)
        b_logs = json.loads(row["record"])["log_dir"]
        before = _snapshot(b_logs)
        assert before
    finally:
        os.kill(a.pid, signal.SIGCONT)
    a_out, a_err = a.communicate(timeout=300)
    assert a.returncode == 0, a_err[-2000:]
    assert "claim taken over by another runner" in a_out and "0 runs/trials made" in a_out
    assert _snapshot(b_logs) == before  # a wrote nothing into b's logs
    (row_after,) = _rows(out)
    assert row_after["record"] == row["record"]
    assert [r["log_dir"] for r in report.load_jsonl(str(out / "results.jsonl"))] == [b_logs]


# ------------------------------------------------------------------------------------------------ store faults
def _store_with_a_run(out) -> None:
    os.makedirs(out, exist_ok=True)
    store = ResultStore(_url(out))
    for i in range(40):
        store.put(f"key{i}", 0, "run", {}, {"loss": "x", "seed": 0, "pad": "y" * 3000})
    store.close()


def _refused(argv, capsys) -> str:
    assert main(argv + ["--losses", "triplet", "--seeds", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_a_damaged_store_is_refused_before_data_loads(tmp_path, no_data, capsys):
    out = tmp_path / "o"
    _store_with_a_run(out)
    with open(out / "results.db", "r+b") as f:
        f.seek(4096 * 4 + 200)
        f.write(os.urandom(4000))
    assert "damaged" in _refused(["--out", str(out)], capsys)
    (out / "results.db").write_bytes(b"not a database at all" * 100)
    assert "cannot be opened" in _refused(["--out", str(out)], capsys)


def test_a_read_only_store_is_refused_before_data_loads(tmp_path, no_data, capsys):
    out = tmp_path / "o"
    _store_with_a_run(out)
    url = f"sqlite:///file:{out / 'results.db'}?mode=ro&uri=true"  # read-only even for root
    assert "cannot be written" in _refused(["--out", str(out), "--storage", url], capsys)


def test_a_table_of_another_layout_is_refused_and_an_older_one_gains_the_lease(tmp_path, no_data, capsys):
    out = tmp_path / "o"
    os.makedirs(out)
    with sqlite3.connect(out / "results.db") as conn:
        conn.execute("CREATE TABLE bench_runs (key TEXT, seed INTEGER, status TEXT, PRIMARY KEY (key, seed))")
    err = _refused(["--out", str(out)], capsys)
    assert "lacks the columns" in err and "'record'" in err
    old = tmp_path / "old"
    os.makedirs(old)
    cols = ", ".join(f"{c.name} {c.type}" for c in RUNS.columns if c.name != "lease")
    with sqlite3.connect(old / "results.db") as conn:
        conn.execute(f"CREATE TABLE bench_runs ({cols}, PRIMARY KEY (key, seed))")
    store = ResultStore(_url(old), lease_seconds=7)
    assert store.claim("k", 0, "run", {})[0] == "mine"
    assert _rows(old)[0]["lease"] == 7
    store.close()


def test_results_from_before_the_store_are_not_overwritten(tmp_path, no_data, capsys):
    out = tmp_path / "o"
    os.makedirs(out)
    (out / "results.jsonl").write_text('{"loss": "triplet", "seed": 0}\n')
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(out), "--losses", "triplet", "--seeds", "1"])
    assert exc.value.code == 2 and "results.jsonl but no results.db" in capsys.readouterr().err
    assert (out / "results.jsonl").read_text() == '{"loss": "triplet", "seed": 0}\n'


def test_a_disk_that_fills_during_a_run_stops_cleanly_and_exports(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "o")
    real = ResultStore.complete
    calls = []

    def complete(self, key, seed, record):
        calls.append(key)
        if len(calls) == 2:
            raise OperationalError("UPDATE bench_runs ...", {}, sqlite3.OperationalError("database or disk is full"))
        return real(self, key, seed, record)

    monkeypatch.setattr(ResultStore, "complete", complete)
    assert main(["--losses", "contrastive", "--seeds", "3", "--out", out] + TINY) == 1
    err = capsys.readouterr().err
    assert "the disk is full" in err and "claims released" in err and "Traceback" not in err
    assert [r["status"] for r in _rows(out)] == ["done"]  # the second run's claim is released
    assert len(report.load_jsonl(os.path.join(out, "results.jsonl"))) == 1


def test_a_pool_that_broke_since_the_last_wait_hands_back_a_broken_future():
    # A worker can die between the scheduler's wait and its next submit: the submit must not raise (that ended the
    # whole command), it hands back a future holding BrokenProcessPool, which the scheduler treats like a running
    # task the dying worker interrupted.
    from benchmarks.execute.executor import WorkerPool

    pool = WorkerPool(2)
    try:
        pool._pool._broken = "a worker died"  # type: ignore[union-attr]  # what the executor sets when one dies
        fut = pool.submit({}, {"loss": "x", "seed": 0})
        assert isinstance(fut.exception(timeout=5), concurrent.futures.process.BrokenProcessPool)
        assert pool.broken
    finally:
        pool._pool._broken = False  # type: ignore[union-attr]
        pool.shutdown()
