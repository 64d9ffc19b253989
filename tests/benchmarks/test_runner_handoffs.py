"""The typed values the runner's stages hand each other: the resolved options, the job and the task, the sealed
test split, the results store's connection (opened once per command) and its database options."""

from __future__ import annotations

import dataclasses
import os

import pytest

from benchmarks.data import bundle as data_bundle
from benchmarks.data.load import load_dataset
from benchmarks.execute.tasks import Task
from benchmarks.losses.registry import REGISTRY
from benchmarks.plan.options import DATASET_DEFAULTS, Options, build_parser, validate
from benchmarks.results.store import ResultStore, _engine_options, open_storage


def _options(tmp_path, *argv: str) -> Options:
    parser = build_parser()
    return validate(parser.parse_args(["--out", str(tmp_path), "--device", "cpu", *argv]), parser)


def test_options_are_frozen_and_carry_the_dataset_defaults(tmp_path):
    opts = _options(tmp_path, "--losses", "rll,triplet", "--seeds", "0,3", "--epochs", "2")
    d = DATASET_DEFAULTS["digits"]
    assert opts.loss_names == ("rll", "triplet") and opts.seeds == (0, 3)
    assert opts.cfg.epochs == 2 and opts.cfg.batch_size == d["batch_size"] and opts.cfg.trunk == d["trunk"]
    assert opts.storage == "sqlite:///" + os.path.join(os.path.abspath(str(tmp_path)), "results.db")
    assert opts.data_root is None and opts.device_arg == "cpu" and opts.workers is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.tune = True  # type: ignore[misc]


def test_a_bad_option_exits_2_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _options(tmp_path, "--epochs", "0")
    assert e.value.code == 2
    assert "--epochs must be >= 1, got 0" in capsys.readouterr().err


def test_sealed_restores_the_previous_state_even_on_an_exception():
    bundle = load_dataset("digits")
    with bundle.sealed():
        with pytest.raises(data_bundle.TestSplitSealedError):
            _ = bundle.test
        with pytest.raises(data_bundle.TestSplitSealedError):
            _ = bundle.gallery
        with bundle.sealed(False):  # read the test split's labels inside a sealed block
            assert len(bundle.test) > 0
        with pytest.raises(data_bundle.TestSplitSealedError):  # sealed again after the inner block
            _ = bundle.test
    assert not bundle.test_sealed and len(bundle.test) > 0
    with pytest.raises(RuntimeError), bundle.sealed():
        raise RuntimeError("a failed tuning trial")
    assert not bundle.test_sealed


def test_task_reads_a_source_task_and_sends_the_other_ranks_no_claim():
    source_task = {
        "entry": REGISTRY["rll"],
        "hparams": {"margin": 0.4},
        "seed": 3,
        "log_dir": "logs/x",
        "fold": 1,
        "folds": [[0, 1], [2, 3]],
        "claim": ("k", 3, "token"),
        "item": object(),  # the source's own fields stay with the source
    }
    task = Task.of(source_task, pbar_position=1)
    assert (task.entry, task.hparams, task.seed, task.log_dir) == (REGISTRY["rll"], {"margin": 0.4}, 3, "logs/x")
    assert (task.fold, task.folds, task.claim, task.pbar_position) == (1, [[0, 1], [2, 3]], ("k", 3, "token"), 1)
    other = task.for_other_ranks()
    assert other.claim is None and other.pbar_position is None
    assert (other.entry, other.seed, other.fold, other.log_dir) == (task.entry, 3, 1, "logs/x")
    run = Task.of({"entry": REGISTRY["rll"], "hparams": None, "seed": 0, "log_dir": "l"})
    assert run.fold is None and run.claim is None


def test_sqlite_is_special_cased_in_one_place():
    assert _engine_options("sqlite:///x.db") == {"connect_args": {"timeout": 120}}
    assert _engine_options("sqlite+pysqlite:///x.db") == {"connect_args": {"timeout": 120}}
    assert _engine_options("postgresql://u@h/db") == {}


def test_a_stopped_store_has_released_its_claims_and_still_reads(tmp_path):
    url = "sqlite:///" + os.path.join(str(tmp_path), "results.db")
    store = ResultStore(url)
    assert store.claim("done", 0, "run", {}) == ("mine", None)
    assert store.complete("done", 0, {"value": 1})
    assert store.claim("held", 0, "run", {}) == ("mine", None)
    store.start_heartbeat()
    store.stop()
    assert store.status("held", 0) is None  # the unfinished claim is given up: a later command redoes it
    assert store.get("done", 0) == {"value": 1}  # and the same connection reads the finished records
    store.close()
    with open_storage(url).connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
