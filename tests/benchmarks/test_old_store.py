"""A results store written by an older runner (commit 0432e25, see data/store_0432e25/README.md) is read by the
current code: with the code digests it stores, every result is reused and exported unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks.core import provenance
from benchmarks.execute import pipeline
from benchmarks.results.store import ResultStore
from benchmarks.run import main

DATA = Path(__file__).parent / "data" / "store_0432e25"
STORED_DIGESTS = {"benchmarks": "b1a571c66d6ad8f1", "pml_rll": "6a6238ca9525189b"}
COMMAND = (
    "--losses triplet,contrastive-xbm --seeds 2 --tune --trials 2 --folds 2 --epochs 1 --iterations-per-epoch 3 "
    "--eval-every 0 --batch-size 32"
).split()  # the command of data/store_0432e25/README.md, without its --out
EXPORTS = ("results.csv", "results_untuned.csv", "trials.csv")


def _records(path: Path) -> list[dict]:
    with open(path) as f:
        return sorted((json.loads(line) for line in f if line.strip()), key=lambda r: json.dumps(r, sort_keys=True))


def test_the_stored_digests_are_the_ones_named_in_its_records(tmp_path):
    shutil.copy(DATA / "results.db", tmp_path / "results.db")  # opened on a copy: the stored file stays as written
    store = ResultStore("sqlite:///" + str(tmp_path / "results.db"))
    try:
        trained = store.records(kind="run") + store.records(kind="fold")  # a trial's record sums up its folds
        assert len(trained) == 12 and len(store.records(kind="trial")) == 4
    finally:
        store.close()
    assert all(r["code"]["digests"] == STORED_DIGESTS for r in trained)


@pytest.mark.parametrize("how", ["patched", "declared"])
def test_a_store_written_before_is_reused_by_the_current_code(tmp_path, monkeypatch, capsys, how):
    """``patched``: the code digests set to the stored ones; ``declared``: the current source declared equivalent
    to the stored digests in an equivalence file, as code_equivalence.txt declares a change that alters no result."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(DATA / "results.db", out / "results.db")

    def no_training(*args, **kwargs):
        pytest.fail("a stored result was trained again")

    if how == "patched":
        monkeypatch.setattr(provenance, "code_digests", lambda: dict(STORED_DIGESTS))
    else:
        declarations = tmp_path / "code_equivalence.txt"
        now = provenance.source_digests()
        changed = sorted(name for name in now if now[name] != STORED_DIGESTS[name])
        declarations.write_text("".join(f"{n} {now[n]} {STORED_DIGESTS[n]}  # test\n" for n in changed))
        monkeypatch.setattr(provenance, "equivalence_path", lambda: str(declarations))
        assert provenance.code_digests() == STORED_DIGESTS
    monkeypatch.setattr(pipeline, "run_one", no_training)
    assert main([*COMMAND, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "\n0 runs/trials made, 12 reused from the store" in "\n" + printed, printed  # 4 trials, 8 runs
    for name in EXPORTS:
        assert (out / name).read_text() == (DATA / name).read_text(), name
    assert _records(out / "results.jsonl") == _records(DATA / "results.jsonl")
