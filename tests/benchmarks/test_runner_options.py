"""Every bad runner option stops before any data is loaded, with exit code 2 and a message naming the option."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from benchmarks.data import load as datasets
from benchmarks.run import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def no_data(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("data loaded before the options were checked")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.delenv("PML_RLL_DATA", raising=False)


BAD = [
    (["--embedding-size", "0"], "--embedding-size must be >= 1"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--iterations-per-epoch", "-5"], "--iterations-per-epoch must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--m-per-class", "0"], "--m-per-class must be >= 1"),
    (["--batch-size", "30", "--m-per-class", "8"], "--batch-size 30 must be a multiple of --m-per-class 8"),
    (["--eval-every", "-1"], "--eval-every must be >= 0"),
    (["--jobs", "0"], "--jobs must be >= 1"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--seeds", "0"], "--seeds 0: the number of seeds must be >= 1"),
    (["--seeds", "1,1"], "seeds [1] repeated"),
    (["--seeds", "0,-3"], "outside"),
    (["--seeds", "a"], "--seeds 'a'"),
    (["--losses", ","], "--losses ',': no loss named"),
    (["--losses", "rll,nope"], "--losses: unknown names ['nope']"),
    (["--losses", "rll,rll"], "named twice"),
    (["--device", "foo"], "--device"),
    (["--set", "rll.Tnn=3"], "rll has no hyper-parameter 'Tnn'"),
    (["--set", "nope.x=3"], "unknown loss 'nope'"),
    (["--set", "rll"], "expected NAME.PARAM=VALUE"),
    (["--set", "rll.margin=-2", "--losses", "rll"], "--set: loss 'rll' cannot be built"),
    (["--config", "/nonexistent/x.toml"], "--config /nonexistent/x.toml"),
    (["--tune", "--folds", "1"], "--folds must be >= 2"),
    (["--tune", "--trials", "0"], "--trials must be >= 1"),
    (["--dataset", "omniglot"], "--data-root is required for omniglot"),
    (["--dataset", "omniglot", "--data-root", "/nonexistent/omniglot"], "does not exist"),
    (["--test-alphabets", "Latin"], "--test-alphabets applies to --dataset omniglot only"),
    (["--lease", "0"], "--lease must be > 0"),
    (["--storage", "not a url"], "--storage"),
    (["--cross-batch-memory", "-1"], "--cross-batch-memory must be >= 0"),
    (["--cross-batch-memory", "10"], "--cross-batch-memory 10 must hold one batch (64)"),
    (["--cross-batch-memory", "128", "--losses", "namr-rll"], "--cross-batch-memory: no selected loss can be wrapped"),
    # refused up front, not after loading data (or by exhausting memory, or after a long wait)
    (["--set", "multi-similarity.beta=0", "--losses", "multi-similarity"], "--set: loss 'multi-similarity' fails"),
    (["--device", "meta"], "--device meta"),
    (["--cross-batch-memory", "4000000000"], "--cross-batch-memory must be <= 1048576"),
    (["--cross-batch-memory", "1048576", "--embedding-size", "4096"], "--cross-batch-memory 1048576 x --embedding"),
    (["--image-size", "100000"], "--image-size must be in 1..4096"),
    (["--embedding-size", "2000000000"], "--embedding-size must be <= 65536"),
    (["--seeds", "2000000000"], "--seeds 2000000000: at most 10000 seeds"),
    (["--seeds", "40000"], "--seeds 40000: at most 10000 seeds"),
    (["--epochs", "1000000000"], "--epochs must be <= 100000"),
    (["--jobs", "100000"], "--jobs must be <= 256"),
    (["--lease", "1e12"], "--lease must be > 0 and <= 86400"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_option_exits_2_naming_it(argv, message, no_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_out_that_is_a_file_or_unwritable(no_data, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(f)])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(f / "below")])
    assert exc.value.code == 2 and "not a writable folder" in capsys.readouterr().err


CONTRASTIVE = "pytorch_metric_learning.losses:ContrastiveLoss"
# (config text, what the message says); every message names --config and the entry (here x or rll) it is about
BAD_CONFIGS = {
    "[losses.x]\nkwargs = { a = 1 }\n": "a new entry needs class",
    "[losses.x]\nclass = 'no_such_module:Loss'\n": "cannot import 'no_such_module:Loss'",
    "[losses.x]\nclass = 'pytorch_metric_learning.losses:NoSuchLoss'\n": "cannot import",
    "[losses.rll]\nkwargs = { Tnn = 3 }\n": "unknown hyper-parameter 'Tnn'",
    "[losses.rll]\nsearch = { margin = [1.0, 0.5] }\n": "low < high",
    "[losses.x]\nclass = 'pytorch_metric_learning.losses:ContrastiveLoss'\nkwargs = { a = 1 }\n": "cannot be built",
    "[losses.x]\nclass = 'pytorch_metric_learning.losses:ContrastiveLoss'\nkwargs = { neg_margin = 'far' }\n": "fails",
    "[losses.x]\nclass = 'collections:OrderedDict'\n": "is not a loss",
    "[losses.rll]\nfoo = 1\n": "unknown keys ['foo']",
}


def test_bad_config_files(no_data, tmp_path, capsys):
    cases = dict(BAD_CONFIGS)
    cases.update({"[other]\n": "unknown top-level tables", "[losses.x\n": "not valid TOML", "losses = 3\n": "table"})
    for text, message in cases.items():
        path = tmp_path / "c.toml"
        path.write_text(text)
        with pytest.raises(SystemExit) as exc:
            main(["--config", str(path), "--out", str(tmp_path / "out")])
        assert exc.value.code == 2, text
        err = capsys.readouterr().err
        assert message in err, (text, err)
        assert f"--config {path}" in err, (text, err)
        if text in BAD_CONFIGS:
            assert ("losses.x" in err or "'x'" in err) if "losses.x]" in text else ("rll" in err), (text, err)


def test_seed_lists_are_checked_in_linear_time():
    from benchmarks.run import parse_seeds

    t0 = time.perf_counter()
    assert parse_seeds(",".join(map(str, range(10_000))), 5) == list(range(10_000))
    with pytest.raises(ValueError, match="at most 10000"):
        parse_seeds(",".join(map(str, range(10_001))), 5)
    assert time.perf_counter() - t0 < 2.0  # a quadratic duplicate check takes seconds here


def test_the_help_states_the_upper_bounds(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("(at most 65536)", "(at most 4096)", "(at most 1.04858e+06)", "(at most 10000 seeds"):
        assert phrase in text, phrase


# ------------------------------------------------------------------------------------------------ config files
@pytest.mark.parametrize("name", ["/abs/dir", "../x", "a/b", ".hidden", "x.y", ""])
def test_entry_names_that_are_not_plain_words_are_refused(name, no_data, tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text(f'[losses."{name}"]\nclass = "{CONTRASTIVE}"\n')
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(path), "--losses", name or "all", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--config {path}" in err and repr(name) in err and "letters, digits" in err


def test_a_module_beside_the_config_shadows_no_installed_module(tmp_path):
    (tmp_path / "colorsys.py").write_text("raise ImportError('the config folder shadowed the standard library')\n")
    (tmp_path / "mine.py").write_text(f"from {CONTRASTIVE.replace(':', ' import ')} as Mine\n")
    path = tmp_path / "c.toml"
    path.write_text('[losses.mine]\nclass = "mine:Mine"\n')
    code = (
        "import sys; from benchmarks.losses.config import load_config; load_config(sys.argv[1]); "
        "import colorsys; print(colorsys.__file__)"
    )
    res = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert str(tmp_path) not in res.stdout  # the standard library's colorsys, while mine.py was found


def test_storage_passwords_are_masked(no_data, tmp_path, capsys):
    from benchmarks.results.store import mask_url
    from benchmarks.run import _masked_argv

    url = "postgresql+psycopg://bench:hunter2@127.0.0.1:1/results"
    assert "hunter2" not in mask_url(url) and "bench:***@127.0.0.1:1/results" in mask_url(url)
    assert mask_url("sqlite:////tmp/r.db") == "sqlite:////tmp/r.db"
    argv = ["--storage", url, f"--storage={url}", "--out", "x"]
    assert all("hunter2" not in a for a in _masked_argv(argv)) and _masked_argv(argv)[-2:] == ["--out", "x"]
    # a store that cannot be reached: the message names --storage, without the password
    assert main(["--storage", url, "--out", str(tmp_path / "out"), "--losses", "triplet", "--seeds", "1"]) == 2
    captured = capsys.readouterr()
    assert "--storage" in captured.err and "hunter2" not in captured.err + captured.out


TORCHRUN_BAD = [
    (["--jobs", "2"], "--jobs > 1 cannot be combined with torchrun"),
    (["--batch-size", "24", "--m-per-class", "4"], "--batch-size 24 must be a multiple of the 5 processes"),
    (["--device", "cuda:0", "--batch-size", "60", "--m-per-class", "4"], "--device cuda:0"),  # a valid batch for 5
]


@pytest.mark.parametrize("argv,message", TORCHRUN_BAD, ids=[" ".join(a) for a, _ in TORCHRUN_BAD])
def test_bad_option_under_torchrun_exits_2_before_joining_the_group(
    argv, message, no_data, tmp_path, capsys, monkeypatch
):
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="5", LOCAL_WORLD_SIZE="5", MASTER_ADDR="127.0.0.1")
    for k, v in dict(env, MASTER_PORT="1").items():  # a group joined at this port would fail, not hang
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
