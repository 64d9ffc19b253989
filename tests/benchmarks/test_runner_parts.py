"""Unit tests of the runner's parts: Recall@k, paired sampler and augmentations, dataset loaders on fake files."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
import torch

from benchmarks.data.bundle import DatasetUnavailableError, PairedDataset, RandomShift
from benchmarks.data.fashion_mnist import read_idx
from benchmarks.data.load import load_dataset
from benchmarks.execute.pipeline import PairedMPerClassSampler
from benchmarks.results.metrics import RetrievalAccuracyCalculator
from benchmarks.run import main


# ---------------------------------------------------------------------------------------------------- metrics
def _loop_reference(emb, labels, ks):
    """Recall@k and P@1 by brute force: each query against every other item, Euclidean, self excluded."""
    n = len(emb)
    recall = {k: 0 for k in ks}
    p1 = 0
    for i in range(n):
        d = [(float(np.linalg.norm(emb[i] - emb[j])), j) for j in range(n) if j != i]
        d.sort()
        nearest = [labels[j] for _, j in d]
        p1 += nearest[0] == labels[i]
        for k in ks:
            recall[k] += labels[i] in nearest[:k]
    return {k: v / n for k, v in recall.items()}, p1 / n


def test_recall_at_k_matches_loop_reference():
    rng = np.random.RandomState(0)
    labels = np.repeat(np.arange(12), 5)
    emb = rng.randn(60, 6) + 0.8 * rng.randn(12, 6)[labels]
    calc = RetrievalAccuracyCalculator(device=torch.device("cpu"), exclude=("NMI",))
    acc = calc.get_accuracy(torch.tensor(emb), torch.tensor(labels))
    recall, p1 = _loop_reference(emb, labels, (1, 2, 4, 8))
    for k in (1, 2, 4, 8):
        assert acc[f"recall_at_{k}"] == pytest.approx(recall[k], abs=1e-12)
    assert acc["precision_at_1"] == pytest.approx(p1, abs=1e-12)
    assert acc["recall_at_1"] == pytest.approx(acc["precision_at_1"])
    assert acc["recall_at_1"] <= acc["recall_at_2"] <= acc["recall_at_4"] <= acc["recall_at_8"]
    assert acc["recall_at_8"] > acc["recall_at_1"]  # the test set is not trivially separable


def test_nmi_is_deterministic_and_perfect_on_separated_clusters():
    labels = np.repeat(np.arange(5), 20)
    emb = np.eye(5)[labels] * 10 + 0.01 * np.random.RandomState(1).randn(100, 5)
    calc = RetrievalAccuracyCalculator(device=torch.device("cpu"), include=("NMI",))
    a = calc.get_accuracy(torch.tensor(emb), torch.tensor(labels))["NMI"]
    assert a == pytest.approx(1.0) and calc.get_accuracy(torch.tensor(emb), torch.tensor(labels))["NMI"] == a


# ---------------------------------------------------------------------------------------------------- pairing
def test_sampler_order_ignores_global_rng_and_keeps_m_per_class():
    labels = np.repeat(np.arange(10), 7)

    def draw(consume):
        s = PairedMPerClassSampler(labels, 4, 16, 64, seed=3)
        torch.manual_seed(consume)
        np.random.seed(consume)
        first = list(iter(s))
        np.random.rand(100), torch.rand(100)
        return first + list(iter(s))

    a, b = draw(0), draw(123)
    assert a == b and len(a) == 128
    other = list(iter(PairedMPerClassSampler(labels, 4, 16, 64, seed=4)))
    assert other != a[:64]
    idx = [i for i, _ in a]
    for start in range(0, 128, 16):
        batch = labels[idx[start : start + 16]]
        assert sorted(np.bincount(batch)[np.bincount(batch) > 0]) == [4, 4, 4, 4]
    assert a[:64] != a[64:]  # epochs differ, the stream continues


def test_augmentation_depends_only_on_the_carried_seed():
    x = torch.arange(2 * 1 * 9 * 9, dtype=torch.float32).reshape(2, 1, 9, 9)
    ds = PairedDataset(x, [0, 1], transform=RandomShift(2))
    torch.manual_seed(0)
    a = ds[(1, 42)][0]
    state = torch.get_rng_state()
    torch.manual_seed(999)
    torch.rand(10)
    b = ds[(1, 42)][0]
    assert torch.equal(a, b)
    outs = {tuple(ds[(1, s)][0].flatten().tolist()) for s in range(20)}
    assert len(outs) > 3  # the seed does change the shift
    torch.manual_seed(0)
    ds[(1, 7)]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left untouched
    assert torch.equal(ds[1][0], x[1])  # plain index: no augmentation (evaluation)


# ---------------------------------------------------------------------------------------------------- datasets
def _write_idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def test_fashion_mnist_reads_idx_files(tmp_path):
    rng = np.random.RandomState(0)
    for kind, n in (("train", 40), ("t10k", 20)):
        _write_idx(tmp_path / f"{kind}-images-idx3-ubyte.gz", rng.randint(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{kind}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    assert read_idx(str(tmp_path / "t10k-labels-idx1-ubyte.gz")).tolist() == (np.arange(20) % 10).tolist()
    b = load_dataset("fashion-mnist", str(tmp_path))
    assert len(b.train) == 40 and len(b.test) == 20 and b.train[(3, 1)][0].shape == (1, 28, 28)
    with pytest.raises(DatasetUnavailableError, match="dataset-fashion-mnist"):
        load_dataset("fashion-mnist", str(tmp_path / "nowhere"))


def _png(path, rng, size=(40, 30), mode="RGB"):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.randint(0, 256, shape).astype(np.uint8), mode).save(path)


def _fake_cub(root, rng):
    base = os.path.join(root, "CUB_200_2011")
    images, labels = [], []
    for c in (1, 2, 101, 102, 150):  # train classes 1-100, test classes 101-200
        for j in range(3):
            rel = f"{c:03d}.bird/img_{j}.jpg"
            _png(os.path.join(base, "images", rel), rng, mode="L" if c == 2 else "RGB")  # CUB has gray images
            images.append(rel)
            labels.append(c)
    with open(os.path.join(base, "images.txt"), "w") as f:
        f.writelines(f"{i + 1} {p}\n" for i, p in enumerate(images))
    with open(os.path.join(base, "image_class_labels.txt"), "w") as f:
        f.writelines(f"{i + 1} {c}\n" for i, c in enumerate(labels))
    return {"train": 6, "test": 9}


def _fake_cars(root, rng):
    names = [f"Make{i}/Model" for i in range(1, 197)]
    with open(os.path.join(root, "names.csv"), "w") as f:
        f.writelines(n + "\n" for n in names)
    rows = {"train": [], "test": []}
    for split, classes in (("train", (1, 98, 99)), ("test", (5, 150))):
        for c in classes:
            for j in range(2):
                fn = f"{split}_{c}_{j}.jpg"
                _png(os.path.join(root, "car_data", "car_data", split, names[c - 1].replace("/", "-"), fn), rng)
                rows[split].append(f"{fn},1,1,10,10,{c}\n")
        with open(os.path.join(root, f"anno_{split}.csv"), "w") as f:
            f.writelines(rows[split])
    return {"train": 6, "test": 4}  # classes 1-98 train (1, 98, 5), 99-196 test (99, 150)


def _fake_sop(root, rng):
    base = os.path.join(root, "Stanford_Online_Products")
    counts = {}
    for split, classes in (("train", (1, 2, 3)), ("test", (11320, 11321))):
        lines = ["image_id class_id super_class_id path\n"]
        for c in classes:
            for j in range(2):
                rel = f"bicycle_final/{split}_{c}_{j}.JPG"
                _png(os.path.join(base, rel), rng)
                lines.append(f"{len(lines)} {c} 1 {rel}\n")
        with open(os.path.join(base, f"Ebay_{split}.txt"), "w") as f:
            f.writelines(lines)
        counts[split] = 2 * len(classes)
    return counts


@pytest.mark.parametrize("name,make", [("cub200", _fake_cub), ("cars196", _fake_cars), ("sop", _fake_sop)])
def test_pml_dataset_loaders_on_fake_folders(tmp_path, name, make):
    pytest.importorskip("torchvision")
    rng = np.random.RandomState(0)
    root = str(tmp_path / name)
    os.makedirs(root)
    counts = make(root, rng)
    b = load_dataset(name, root, image_size=32)
    assert (len(b.train), len(b.test)) == (counts["train"], counts["test"])
    assert b.input_kind == "rgb"
    assert set(b.train.labels.tolist()) == set(range(b.num_train_classes))  # remapped to 0..C-1
    x, y = b.train[(0, 5)]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(b.train[(0, 5)][0], x) and torch.equal(b.test[0][0], b.test[0][0])
    assert b.test[0][0].shape == (3, 32, 32)


def test_missing_image_dataset_fails_clearly(tmp_path, capsys):
    with pytest.raises(DatasetUnavailableError, match="--data-root"):
        load_dataset("cub200", None)
    with pytest.raises(DatasetUnavailableError, match="does not exist"):
        load_dataset("cars196", str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetUnavailableError, match="could not read"):
        load_dataset("sop", str(empty))
    with pytest.raises(SystemExit) as exc:  # checked with the options, before anything is loaded
        main(["--dataset", "cub200", "--data-root", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err
    assert main(["--dataset", "sop", "--data-root", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "could not read" in capsys.readouterr().err
