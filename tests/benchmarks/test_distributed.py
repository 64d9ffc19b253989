"""Data-parallel runner (benchmarks/execute/distributed.py): sharding, one DDP step against one process, torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from benchmarks.execute import distributed
from benchmarks.execute.pipeline import PairedMPerClassSampler

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- without processes -----------------------------------------------------------------------------------------


def test_shards_concatenate_to_the_single_process_batches():
    labels = np.repeat(np.arange(10), 7)
    batch, iters = 24, 5

    def sampler():
        return PairedMPerClassSampler(labels, 4, batch, iters * batch, seed=3)

    full = list(sampler())
    assert len(full) == iters * batch
    for world in (1, 2, 3, 4):
        shards = [list(distributed.GlobalBatchShard(sampler(), batch, r, world)) for r in range(world)]
        b = batch // world
        assert all(len(s) == iters * b for s in shards)
        lengths = [len(distributed.GlobalBatchShard(sampler(), batch, r, world)) for r in range(world)]
        assert lengths == [iters * b] * world
        rebuilt = [x for i in range(iters) for s in shards for x in s[i * b : (i + 1) * b]]
        assert rebuilt == full  # same indices, same augmentation seeds, same order
    with pytest.raises(ValueError, match="not divisible"):
        distributed.GlobalBatchShard(sampler(), batch, 0, 5)
    with pytest.raises(ValueError, match="rank"):
        distributed.GlobalBatchShard(sampler(), batch, 2, 2)


def test_single_process_context_changes_nothing():
    ctx = distributed.setup("cpu", environ={})
    assert not ctx.is_distributed and ctx.is_main and ctx.describe() == {"world_size": 1, "backend": None}
    assert not distributed.launched_by_torchrun({"RANK": "0"})
    env = dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="x", MASTER_PORT="1")
    assert distributed.launch_world_size(env) == 2 and distributed.launch_world_size({}) == 1
    assert distributed.process_device("cpu", env) == torch.device("cpu")
    with pytest.raises(ValueError, match="one GPU"):
        distributed.process_device("cuda:0", env)
    model, loss = torch.nn.Linear(3, 2), torch.nn.MSELoss()
    s = [1, 2, 3]
    assert distributed.wrap_model(model) is model
    assert distributed.wrap_loss(loss, None) == (loss, None)
    assert distributed.shard_sampler(s, 8) == (s, 8)
    assert ctx.broadcast_object({"a": 1}) == {"a": 1}
    with pytest.raises(ValueError, match="mode"):
        distributed.DistributedLoss(loss, "fast", 2)
    with pytest.raises(ValueError, match="one GPU"):
        distributed._process_device("cuda:0", 1, local_world_size=2)
    assert distributed._process_device("cpu", 1, local_world_size=2) == torch.device("cpu")


# ---- one training step, 2 gloo processes against one process -----------------------------------------------------

LOSSES = ("triplet", "namr-rll", "proxy-anchor", "rll")  # gathered + miner, gathered NAMR, loss parameters, efficient


class _FirstStepDone(Exception):
    """Raised by the patched trainer after its first step, carrying the trainer out of run_one."""

    def __init__(self, trainer):
        super().__init__("first step done")
        self.trainer = trainer


def _one_step(trainer, *args, **kwargs):
    trainer.initialize_dataloader()
    trainer.set_to_train()
    trainer.forward_and_backward()  # the optimizers step, the gradients stay in .grad
    raise _FirstStepDone(trainer)


def _first_step(name: str, log_dir: str) -> tuple[dict[str, torch.Tensor], str]:
    """run_one on digits (with whatever distributed context is current), stopped after the first training step:
    the gradients of the trunk and of the loss's own parameters, the loss value, and the loss's distributed mode."""
    from benchmarks.data.load import load_dataset
    from benchmarks.execute import pipeline
    from benchmarks.losses.registry import REGISTRY

    cfg = pipeline.RunConfig("digits", "mlp", 16, 32, 4, 1, 1, 1e-3, 0.0, "constant", 0, 256)
    original = pipeline.BenchmarkTrainer.train
    pipeline.BenchmarkTrainer.train = _one_step
    try:
        bundle = load_dataset("digits")
        pipeline.run_one(bundle, REGISTRY[name], None, 0, cfg, torch.device("cpu"), log_dir=log_dir, pbar_position=None)
        raise AssertionError("run_one finished without training")
    except _FirstStepDone as done:
        trainer = done.trainer
    finally:
        pipeline.BenchmarkTrainer.train = original
    loss = trainer.loss_funcs["metric_loss"]
    trunk = distributed.unwrap(trainer.models["trunk"])
    grads = {f"trunk.{k}": p.grad.clone() for k, p in trunk.named_parameters()}
    grads.update({f"loss.{i}": p.grad.clone() for i, p in enumerate(loss.parameters()) if p.requires_grad})
    grads["loss_value"] = torch.as_tensor(trainer.losses["total_loss"]).detach().clone()
    return grads, getattr(loss, "mode", "single")


def _step_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env = dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    ctx = distributed.setup("cpu", environ=dict(env, MASTER_PORT=str(port)))
    results = {name: _first_step(name, os.path.join(os.path.dirname(out), f"logs{rank}")) for name in LOSSES}
    if rank == 0:  # a file, not a queue: a pipe blocks on large payloads while the parent waits in join
        torch.save(results, out)
    ctx.cleanup()
    os._exit(0)  # skip interpreter teardown, where gloo's threads sometimes abort the process after the work is done


def test_first_step_gradients_equal_one_process_on_the_global_batch(one_thread, tmp_path):
    path = str(tmp_path / "rank0.pt")
    mp.spawn(_step_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    got = torch.load(path)
    modes = {n: got[n][1] for n in LOSSES}
    assert modes == {"triplet": "gather", "namr-rll": "gather", "proxy-anchor": "gather", "rll": "efficient"}
    for name in LOSSES:
        single, _ = _first_step(name, str(tmp_path / "single"))
        multi = got[name][0]
        assert multi.keys() == single.keys()
        assert any(k.startswith("loss.") for k in single) == (name == "proxy-anchor")
        for k in single:
            assert single[k].abs().sum() > 0, (name, k)
            gap = (multi[k] - single[k]).abs().max()
            assert torch.allclose(multi[k], single[k], atol=1e-5, rtol=1e-4), (name, k, gap)


# ---- the runner under torchrun -------------------------------------------------------------------------------------


def _torchrun(args, out, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    cmd += ["--master_port", str(_free_port()), "-m", "benchmarks.run", "--out", out] + args
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _stored(out: str, kind: str) -> list[dict]:
    from benchmarks.results.store import ResultStore

    store = ResultStore("sqlite:///" + os.path.join(out, "results.db"))
    try:
        return store.records(kind=kind)
    finally:
        store.close()


def test_torchrun_two_processes_write_one_result_that_learns(tmp_path):
    from benchmarks.run import main

    out = str(tmp_path / "ddp")
    args = ["--losses", "rll", "--seeds", "1", "--epochs", "2", "--iterations-per-epoch", "4", "--eval-every", "2"]
    proc = _torchrun(args, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("rll                    untuned  seed 0: MAP@R") == 1  # rank 1 prints nothing
    assert "distributed: 2 processes, backend gloo" in proc.stdout
    lines = open(os.path.join(out, "results.jsonl")).read().splitlines()
    assert len(lines) == 1 and len(_stored(out, "run")) == 1
    rec = json.loads(lines[0])
    assert rec["world_size"] == 2 and rec["backend"] == "gloo" and rec["iterations"] == 8
    before, after = rec["untrained"]["mean_average_precision_at_r"], rec["metrics"]["mean_average_precision_at_r"]
    assert after > before + 0.1, (before, after)  # efficient=True (rll) learns
    files = set(os.listdir(out)) - {"results.db-wal", "results.db-shm"}
    exports = {"results.csv", "results.jsonl", "results.md", "results.png", "verdict.csv", "verdict.md", "verdict.png"}
    assert files == {"logs", "results.db"} | exports
    assert len(os.listdir(os.path.join(out, "logs"))) == 1  # one run's logs, written by rank 0

    # the same command again: the run is found (world size 2) and nothing is duplicated
    proc = _torchrun(args, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 runs/trials made, 1 reused from the store" in proc.stdout
    assert len(open(os.path.join(out, "results.jsonl")).read().splitlines()) == 1
    assert len(_stored(out, "run")) == 1

    # one process on the same global batches: a different key, and the same training up to rounding
    assert main(args + ["--out", out]) == 0
    recs = _stored(out, "run")
    assert sorted(r.get("world_size", 1) for r in recs) == [1, 2]
    one = next(r for r in recs if r["world_size"] == 1)
    assert one["untrained"] == rec["untrained"]
    assert np.allclose(one["loss_curve"], rec["loss_curve"], rtol=1e-3)


def test_torchrun_cross_batch_memory_trains_like_one_process(tmp_path):
    from benchmarks.run import main

    out = str(tmp_path / "xbm")
    args = ["--losses", "rll,namr-rll", "--seeds", "1", "--epochs", "1", "--iterations-per-epoch", "3"]
    args += ["--eval-every", "0", "--cross-batch-memory", "128"]
    proc = _torchrun(args, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "skipping namr-rll: NAMRLoss packs two embeddings" in proc.stdout
    assert main(args + ["--out", out]) == 0
    recs = {r["world_size"]: r for r in _stored(out, "run")}
    assert sorted(recs) == [1, 2] and {r["loss"] for r in recs.values()} == {"rll"}
    assert recs[2]["config"]["cross_batch_memory"] == 128
    # the same memory and the same per-query losses in both: the training matches up to rounding
    assert np.allclose(recs[1]["loss_curve"], recs[2]["loss_curve"], rtol=1e-4)
    m1, m2 = recs[1]["metrics"], recs[2]["metrics"]
    assert m1["mean_average_precision_at_r"] == pytest.approx(m2["mean_average_precision_at_r"], abs=1e-3)


def test_torchrun_tune_every_rank_trains_rank_0s_trials(tmp_path):
    out = str(tmp_path / "tune")
    args = ["--losses", "rll", "--seeds", "1", "--epochs", "1", "--iterations-per-epoch", "2", "--eval-every", "0"]
    args += ["--tune", "--trials", "2", "--folds", "2", "--batch-size", "32", "--set", "rll.margin=0.5"]
    proc = _torchrun(args, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folds, trials, runs = (_stored(out, k) for k in ("fold", "trial", "run"))
    assert len(trials) == 2 and all(t["value"] is not None for t in trials)
    assert len(folds) == 4 and {f["world_size"] for f in folds} == {2}
    assert {r["world_size"] for r in runs} == {2} and {r["variant"] for r in runs} <= {"untuned", "tuned"}
