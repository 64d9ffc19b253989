"""The results store: claims, takeover of dead runners' claims, concurrent runners, killed runs, changed inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from benchmarks.results import report
from benchmarks.results.store import RUNS, ResultStore
from benchmarks.run import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--epochs", "1", "--iterations-per-epoch", "3", "--eval-every", "0"]


def _url(out) -> str:
    return "sqlite:///" + os.path.join(str(out), "results.db")


def _rows(out) -> list[dict]:
    store = ResultStore(_url(out))
    with store.engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(RUNS.select()).mappings()]
    store.close()
    return rows


def _runner(out, *args) -> list[str]:
    return [sys.executable, "-m", "benchmarks.run", "--out", str(out), *args]


# ------------------------------------------------------------------------------------------------ claims
def test_claims_are_exclusive_and_dead_claims_are_taken_over(tmp_path):
    a = ResultStore(_url(tmp_path), lease_seconds=0.5)
    b = ResultStore(_url(tmp_path), lease_seconds=0.5)
    assert a.claim("k", 0, "run", {"x": 1})[0] == "mine"
    assert b.claim("k", 0, "run", {"x": 1}) == ("busy", None)  # a's heartbeat is fresh
    a.set_payload("k", 0, {"trial_number": 3})
    time.sleep(0.6)  # a stops beating: its lease runs out
    assert b.claim("k", 0, "run", {"x": 1}) == ("mine", {"trial_number": 3})
    assert not a.complete("k", 0, {"by": "a"})  # a lost the claim: its record is dropped
    assert b.complete("k", 0, {"by": "b"})
    assert a.claim("k", 0, "run", {"x": 1}) == ("done", {"by": "b"})
    assert a.get("k", 0) == {"by": "b"} and [r for r in a.records()] == [{"by": "b"}]
    # a claim whose worker process is gone (same host) is taken over at once, whatever the lease
    c = ResultStore(_url(tmp_path), lease_seconds=3600)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert c.claim("k2", 0, "run", {})[0] == "mine"
    with c.engine.begin() as conn:
        conn.execute(RUNS.update().values(worker=f"{c.host}:{dead.pid}").where(RUNS.c.key == "k2"))
    d = ResultStore(_url(tmp_path), lease_seconds=3600)
    assert d.claim("k2", 0, "run", {})[0] == "mine"
    # a released claim is deleted: the next runner claims it afresh
    d.release("k2", 0)
    assert c.status("k2", 0) is None
    for s in (a, b, c, d):
        s.close()


# ------------------------------------------------------------------------------------------------ runners
def test_two_runners_on_one_store_run_everything_exactly_once(tmp_path):
    out = tmp_path / "shared"
    args = _runner(out, "--losses", "triplet,contrastive,ntxent", "--seeds", "3", *TINY)
    procs = [
        subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    made = [int(o.split(" runs/trials made")[0].rsplit("\n", 1)[-1]) for o in outs]
    assert sum(made) == 9, outs  # every run made by exactly one of the two
    rows = _rows(out)
    assert len(rows) == 9 and {r["status"] for r in rows} == {"done"}
    recs = report.load_jsonl(os.path.join(out, "results.jsonl"))
    assert sorted((r["loss"], r["seed"]) for r in recs) == sorted(
        (n, s) for n in ("triplet", "contrastive", "ntxent") for s in range(3)
    )


def _children(pid: int) -> list[int]:
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(x) for x in f.read().split()]
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "State:\tZ" not in f.read()
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc to find worker processes")
def test_killed_runner_leaves_no_workers_nor_half_records_and_restarts_clean(tmp_path):
    out = tmp_path / "killed"
    args = _runner(
        out, "--losses", "triplet,contrastive", "--seeds", "3", "--epochs", "2", "--iterations-per-epoch", "40",
        "--eval-every", "0",
    )  # fmt: skip
    proc = subprocess.Popen(args + ["--jobs", "2"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until the first run is recorded and others are running
        if os.path.exists(out / "results.db") and any(r["status"] == "done" for r in _rows(out)):
            break
        time.sleep(0.5)
    workers = _children(proc.pid)
    assert workers and proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.2)
    assert not any(_alive(p) for p in workers), "worker processes outlived the killed runner"
    rows = _rows(out)
    done = {(r["key"], r["seed"]) for r in rows if r["status"] == "done"}
    assert all(json.loads(r["record"])["iterations"] == 80 for r in rows if r["status"] == "done")
    # plant a marker in every log folder: a run that is redone must start from empty logs
    for dirpath, dirnames, _ in os.walk(out / "logs"):
        if os.path.basename(dirpath).startswith("claim-"):  # logs/<key>/<loss>/seed<s>/claim-<token>
            open(os.path.join(dirpath, "stale-marker"), "w").close()
            dirnames.clear()
    res = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)  # --jobs is not in the key
    assert res.returncode == 0, res.stderr[-2000:]
    rows = _rows(out)
    assert len(rows) == 6 and {r["status"] for r in rows} == {"done"}  # no duplicate, no half record
    for r in rows:
        rec = json.loads(r["record"])
        marker = os.path.exists(os.path.join(rec["log_dir"], "stale-marker"))
        assert marker == ((r["key"], r["seed"]) in done)  # only finished runs kept their logs


def test_no_resume_replaces_and_changed_hyper_parameters_rerun(tmp_path, capsys):
    out = str(tmp_path / "o")
    args = ["--losses", "contrastive", "--seeds", "2", "--out", out] + TINY
    assert main(args) == 0
    first = {(r["key"], r["seed"]): r["finished_at"] for r in _rows(out)}
    capsys.readouterr()
    assert main(args + ["--no-resume"]) == 0
    assert "2 runs/trials made, 0 reused" in capsys.readouterr().out
    rows = _rows(out)
    assert len(rows) == 2 and all(r["finished_at"] > first[(r["key"], r["seed"])] for r in rows)
    assert len(report.load_jsonl(os.path.join(out, "results.jsonl"))) == 2  # replaced, not appended
    with open(os.path.join(out, "results.jsonl"), "a") as f:  # a foreign line: the export is not read back
        f.write('{"foreign": true}\nnot json\n')
    assert main(args) == 0
    assert "0 runs/trials made, 2 reused" in capsys.readouterr().out
    assert len(report.load_jsonl(os.path.join(out, "results.jsonl"))) == 2  # regenerated from the store
    assert main(args + ["--set", "contrastive.neg_margin=0.9"]) == 0
    assert "2 runs/trials made, 0 reused" in capsys.readouterr().out
    recs = report.load_jsonl(os.path.join(out, "results.jsonl"))
    assert len(recs) == 2 and {r["hparams"]["neg_margin"] for r in recs} == {0.9}


def _fake_omniglot(root, alphabets=("Alpha", "Beta", "Gamma", "Delta"), characters=4, drawings=5):
    from PIL import Image

    rng = np.random.RandomState(0)
    for a in alphabets:
        for c in range(characters):
            folder = os.path.join(root, "images_background", a, f"character{c:02d}")
            os.makedirs(folder)
            for k in range(drawings):
                img = (rng.rand(12, 12) > 0.5).astype(np.uint8) * 255
                Image.fromarray(img, "L").save(os.path.join(folder, f"{k}.png"))


def test_changed_test_alphabets_or_data_rerun(tmp_path, capsys):
    root = str(tmp_path / "omni")
    _fake_omniglot(root)
    base = ["--dataset", "omniglot", "--data-root", root, "--image-size", "12", "--losses", "contrastive"]
    base += ["--seeds", "1", "--batch-size", "8", "--m-per-class", "4", "--out", str(tmp_path / "o")] + TINY
    assert main(base + ["--test-alphabets", "Alpha,Beta"]) == 0
    assert main(base + ["--test-alphabets", "Alpha,Beta"]) == 0
    assert "0 runs/trials made, 1 reused" in capsys.readouterr().out
    assert main(base + ["--test-alphabets", "Gamma,Delta"]) == 0
    assert "1 runs/trials made, 0 reused" in capsys.readouterr().out
    png = os.path.join(root, "images_background", "Alpha", "character00", "0.png")
    os.utime(png, (time.time() + 10, time.time() + 10))  # the data changed: a new key
    assert main(base + ["--test-alphabets", "Gamma,Delta"]) == 0
    assert "1 runs/trials made, 0 reused" in capsys.readouterr().out
    recs = report.load_jsonl(str(tmp_path / "o" / "results.jsonl"))
    assert len(recs) == 1 and "Gamma" in recs[0]["command"]
    assert main(base + ["--test-alphabets", "Nope"]) == 2
    assert "unknown alphabets ['Nope']" in capsys.readouterr().err
