"""Your own data, backbone and precision end to end: timm and torchvision trunks, --trunk-weights, --freeze-bn,
--amp, and the runner on a tiny image folder and a tiny CSV dataset (random weights, nothing downloaded)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from benchmarks.data.load import load_dataset
from benchmarks.examples.make_tiny_dataset import make_tiny_dataset
from benchmarks.execute import pipeline
from benchmarks.execute.pipeline import RunConfig, build_trunk, run_one
from benchmarks.execute.trunks import TrunkError
from benchmarks.losses.registry import REGISTRY
from benchmarks.results.knn import canonical_knn
from benchmarks.run import main

timm = pytest.importorskip("timm")

TINY_TIMM = "timm:test_resnet"


def _records(out):
    with open(os.path.join(out, "results.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(str(tmp_path_factory.mktemp("tiny")), classes=12, per_class=8, size=32)


RUN = [
    "--losses", "rll,triplet", "--seeds", "1", "--trunk", TINY_TIMM, "--amp", "bf16", "--image-size", "32",
    "--batch-size", "16", "--m-per-class", "4", "--epochs", "3", "--iterations-per-epoch", "10",
    "--embedding-size", "16", "--lr", "3e-3", "--weight-decay", "0", "--workers", "0", "--eval-every", "1",
]  # fmt: skip


@pytest.mark.parametrize("kind", ["folder", "csv"])
def test_runner_end_to_end_on_own_data_with_timm_trunk_and_bf16(kind, tiny, tmp_path, capsys):
    out = str(tmp_path / kind)
    assert main(["--dataset", kind, "--data-root", tiny[kind], "--out", out] + RUN) == 0
    recs = _records(out)
    assert sorted(r["loss"] for r in recs) == ["rll", "triplet"]
    for r in recs:
        assert r["dataset"] == kind and r["precision"] == "bfloat16 autocast"
        assert r["config"]["amp"] == "bf16" and r["config"]["trunk"] == TINY_TIMM
        assert r["trunk"] == "timm test_resnet (random init)"
        if kind == "csv":
            assert r["data"]["csv"] == os.path.realpath(tiny["csv"]) and r["data"]["images"] == 96
        else:
            assert r["data"]["root"] == os.path.realpath(tiny["folder"]) and r["data"]["files"] == 96
        curve = [p["mean_average_precision_at_r"] for p in r["curve"]]
        assert all(np.isfinite(curve)) and all(np.isfinite(r["loss_curve"]))
        assert curve[-1] > curve[0] + 0.03, (r["loss"], curve)  # it learns: MAP@R on unseen classes goes up
    capsys.readouterr()
    if kind == "csv":  # same data: reused; a changed image: new data, a new key
        one = ["--dataset", kind, "--data-root", tiny[kind], "--out", out] + RUN[:1] + ["triplet"] + RUN[2:]
        assert main(one) == 0
        assert "0 runs/trials made, 1 reused" in capsys.readouterr().out
        img = os.path.join(tiny["folder"], "class_011", "000.png")
        st = os.stat(img)
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
        assert main(one) == 0
        assert "1 runs/trials made, 0 reused" in capsys.readouterr().out


def test_timm_and_torchvision_trunks_read_their_width(tmp_path):
    torch.manual_seed(0)
    trunk, width, note = build_trunk(TINY_TIMM, (3, 32, 32))
    assert trunk(torch.randn(2, 3, 32, 32)).shape == (2, width) and "timm test_resnet" in note
    gray, gwidth, _ = build_trunk(TINY_TIMM, (1, 28, 28))  # timm adapts the stem to one channel
    assert gray(torch.randn(2, 1, 28, 28)).shape == (2, gwidth)
    tv, tv_width, tv_note = build_trunk("mobilenet_v3_small", (3, 32, 32), pretrained=False)
    assert tv_width == 1024 and tv(torch.randn(2, 3, 32, 32)).shape == (2, 1024)  # the last Linear removed
    assert tv_note == "torchvision mobilenet_v3_small (random init)"
    with pytest.raises(TrunkError, match="needs image inputs"):
        build_trunk(TINY_TIMM, (64,))
    with pytest.raises(TrunkError, match="cannot take the dataset's inputs"):
        build_trunk("mobilenet_v3_small", (1, 32, 32), pretrained=False)  # torchvision stems want 3 channels


def test_trunk_weights_load_a_full_checkpoint_and_reject_a_mismatch(tmp_path):
    torch.manual_seed(1)
    full = timm.create_model("test_resnet", pretrained=False, num_classes=7)  # with a classifier head
    path = str(tmp_path / "w.pth")
    torch.save({"state_dict": {"module." + k: v for k, v in full.state_dict().items()}}, path)
    trunk, _, note = build_trunk(TINY_TIMM, (3, 32, 32), weights=path)
    assert note == "timm test_resnet (weights w.pth)"
    for k, v in trunk.state_dict().items():
        assert torch.equal(v, full.state_dict()[k]), k
    other = str(tmp_path / "other.pth")
    torch.save(timm.create_model("test_efficientnet", pretrained=False).state_dict(), other)
    with pytest.raises(TrunkError, match=r"other.pth does not match the trunk: keys \d+ missing"):
        build_trunk(TINY_TIMM, (3, 32, 32), weights=other)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(TrunkError, match="cannot be read as torch weights"):
        build_trunk(TINY_TIMM, (3, 32, 32), weights=str(junk))


def test_runner_rejects_bad_trunks_and_weights_before_training(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "run_one", lambda *a, **k: pytest.fail("training started"))
    other = str(tmp_path / "other.pth")
    torch.save(timm.create_model("test_efficientnet", pretrained=False).state_dict(), other)
    base = ["--dataset", "folder", "--data-root", tiny["folder"], "--out", str(tmp_path / "o")] + RUN
    assert main(base + ["--trunk-weights", other]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match the trunk" in err[0]
    assert main(["--trunk", TINY_TIMM, "--out", str(tmp_path / "d")]) == 2  # digits: flat vectors
    assert "needs image inputs" in capsys.readouterr().err
    for argv, message in [
        (["--trunk", "timm:no_such_model"], "timm has no model 'no_such_model'"),
        (["--trunk", "nonsense"], "--trunk nonsense: not a built-in trunk"),
        (["--trunk-weights", str(tmp_path / "missing.pth")], "--trunk-weights"),
        (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs a CUDA device"),
        (["--amp", "fp32"], "--amp"),
        (["--knn", "annoy"], "--knn"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(argv + ["--out", str(tmp_path / "o")])
        assert exc.value.code == 2 and message in capsys.readouterr().err, argv


def test_weights_and_precision_are_part_of_the_key(tmp_path):
    base = dict(
        dataset="digits", trunk="mlp", embedding_size=8, batch_size=8, m_per_class=2, epochs=1,
        iterations_per_epoch=1, lr=1e-3, weight_decay=0.0, schedule="constant", eval_every=0, eval_batch_size=64,
    )  # fmt: skip
    plain = RunConfig(**base).key()
    assert "amp" not in plain and "knn" not in plain and "freeze_bn" not in plain  # earlier keys unchanged
    keys = [
        RunConfig(**base, amp="bf16").key(),
        RunConfig(**base, knn="faiss-hnsw").key(),
        RunConfig(**base, freeze_bn=True).key(),
        RunConfig(**base, eval_precision="float16").key(),
        RunConfig(**base, trunk_weights="/a/w.pth", trunk_weights_sha1="1" * 40).key(),
    ]
    assert len({json.dumps(k, sort_keys=True) for k in keys + [plain]}) == 6
    moved = RunConfig(**base, trunk_weights="/b/w.pth", trunk_weights_sha1="1" * 40).key()
    assert moved == keys[-1]  # the file's content decides, not its path


def _cfg(**kw):
    base = dict(
        dataset="digits", trunk="mlp", embedding_size=16, batch_size=32, m_per_class=4, epochs=1,
        iterations_per_epoch=6, lr=1e-3, weight_decay=0.0, schedule="constant", eval_every=1, eval_batch_size=256,
    )  # fmt: skip
    base.update(kw)
    return RunConfig(**base)


@pytest.mark.parametrize(
    "loss,amp,extra",
    [
        ("rll", "bf16", {}),
        ("multi-similarity", "bf16", {}),
        ("rll", "fp16", {"cross_batch_memory": 64}),  # GradScaler with a cross-batch memory
        ("contrastive", "fp16", {"cross_batch_memory": 64}),
        ("namr-rll", "bf16", {"knn": "faiss-hnsw"}),  # re-ranking the approximate index's candidates
        ("namr-rll", "fp16", {"knn": "faiss-ivf"}),
        ("proxy-anchor", "fp16", {}),  # a loss with parameters of its own, scaled too
    ],
)
def test_mixed_precision_trains_every_path_on_cpu(loss, amp, extra, tmp_path, one_thread):
    """bf16 is what a CPU runs; fp16 and its GradScaler run here too (the runner allows fp16 on CUDA only)."""
    bundle = load_dataset("digits")
    seen = {}

    def after(trunk, embedder, spec):
        seen["trunk"] = trunk
        return {}

    rec = run_one(
        bundle, REGISTRY[loss], {}, 0, _cfg(amp=amp, **extra), torch.device("cpu"), log_dir=str(tmp_path),
        pbar_position=None, after_training=after,
    )  # fmt: skip
    assert rec["precision"] == {"bf16": "bfloat16 autocast", "fp16": "float16 autocast + GradScaler"}[amp]
    assert rec["knn"] == canonical_knn(extra.get("knn", "exact"))  # the index settings spelled out
    assert all(np.isfinite(rec["loss_curve"])) and rec["iterations"] == 6
    assert 0 < rec["metrics"]["mean_average_precision_at_r"] <= 1
    if loss.startswith("namr"):
        assert "plain_mean_average_precision_at_r" in rec["metrics"]
    assert all(p.dtype == torch.float32 for p in seen["trunk"].parameters())  # master weights stay float32


def test_trainer_scales_fp16_and_autocasts_the_trunk(one_thread):
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.arange(64) % 8
    ds = torch.utils.data.TensorDataset(x, y)
    trunk, emb = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)
    from pytorch_metric_learning.losses import TripletMarginLoss

    seen = []
    trunk.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    t = pipeline.BenchmarkTrainer(
        models={"trunk": trunk, "embedder": emb},
        optimizers={"trunk_optimizer": torch.optim.SGD(trunk.parameters(), 0.1)},
        batch_size=16, loss_funcs={"metric_loss": TripletMarginLoss()}, mining_funcs={}, dataset=ds,
        iterations_per_epoch=3, data_device=torch.device("cpu"), amp="fp16",
    )  # fmt: skip
    assert t.scaler is not None
    before = trunk.weight.detach().clone()
    t.train(num_epochs=1)
    assert seen and set(seen) == {torch.float16}
    assert not torch.equal(before, trunk.weight) and trunk.weight.dtype == torch.float32
    assert t.scaler.get_scale() > 0
    with pytest.raises(ValueError, match="amp"):
        pipeline.BenchmarkTrainer(
            models={"trunk": trunk, "embedder": emb}, optimizers={}, batch_size=4, loss_funcs={}, mining_funcs={},
            dataset=ds, amp="fp8",
        )  # fmt: skip


def test_freeze_bn_keeps_the_trunks_batchnorm_statistics(tiny, tmp_path, one_thread):
    bundle = load_dataset("folder", tiny["folder"], image_size=16)
    stats = {}

    def after(trunk, embedder, spec):
        bns = [m for m in trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        stats["mean"] = [m.running_mean.clone() for m in bns]
        return {}

    for freeze in (False, True):
        cfg = _cfg(dataset="folder", trunk="convnet-small", batch_size=8, m_per_class=2, iterations_per_epoch=2,
                   eval_every=0, image_size=16, freeze_bn=freeze)  # fmt: skip
        run_one(bundle, REGISTRY["triplet"], {}, 0, cfg, torch.device("cpu"), log_dir=str(tmp_path / str(freeze)),
                pbar_position=None, after_training=after)  # fmt: skip
        moved = any(bool(m.abs().sum() > 0) for m in stats["mean"])
        assert moved is (not freeze)


def test_namr_entry_on_query_gallery_csv_with_timm_bf16_and_an_approximate_index(tiny, tmp_path):
    out = str(tmp_path / "namr")
    argv = ["--dataset", "csv", "--data-root", tiny["csv"], "--out", out, "--knn", "faiss-hnsw", "--freeze-bn"]
    argv += RUN[2:] + ["--losses", "namr-rll", "--epochs", "1", "--iterations-per-epoch", "3", "--eval-every", "0"]
    assert main(argv) == 0
    (rec,) = _records(out)
    assert (
        rec["loss"] == "namr-rll"
        and rec["knn"] == canonical_knn("faiss-hnsw")
        and rec["precision"] == "bfloat16 autocast"
    )
    assert rec["config"]["freeze_bn"] is True
    for m in ("mean_average_precision_at_r", "plain_mean_average_precision_at_r", "recall_at_1"):
        assert 0 < rec["metrics"][m] <= 1, m  # re-ranked and plain retrieval of 12 queries in a gallery of 12
