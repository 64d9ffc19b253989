"""Every bad runner option stops before any data is loaded, with exit code 2 and a message naming the option."""

from __future__ import annotations

import pytest

from benchmarks import datasets
from benchmarks.run import main


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


def test_bad_config_files(no_data, tmp_path, capsys):
    cases = {
        "[losses.x]\nkwargs = { a = 1 }\n": "a new entry needs class",
        "[losses.x]\nclass = 'no_such_module:Loss'\n": "cannot import 'no_such_module:Loss'",
        "[losses.rll]\nkwargs = { Tnn = 3 }\n": "unknown hyper-parameter 'Tnn'",
        "[losses.rll]\nsearch = { margin = [1.0, 0.5] }\n": "low < high",
        "[losses.rll]\nfoo = 1\n": "unknown keys ['foo']",
        "[other]\n": "unknown top-level tables",
        "[losses.x\n": "not valid TOML",
    }
    for text, message in cases.items():
        path = tmp_path / "c.toml"
        path.write_text(text)
        with pytest.raises(SystemExit) as exc:
            main(["--config", str(path), "--out", str(tmp_path / "out")])
        assert exc.value.code == 2, text
        assert message in capsys.readouterr().err, text


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
