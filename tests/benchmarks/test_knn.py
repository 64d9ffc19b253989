"""Evaluation at scale: ScalableKNN and the chunked retrieval metrics against slow references from the math."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from benchmarks.eval_scale import main as scale_main
from benchmarks.eval_scale import synthetic, worker
from benchmarks.results.knn import KNN_METHODS, ScalableKNN, evaluate_embeddings, needed_k, retrieval_metrics
from benchmarks.results.metrics import RetrievalAccuracyCalculator

faiss = pytest.importorskip("faiss")


@pytest.fixture(autouse=True)
def faiss_one_thread():
    # HNSW's graph depends on the order in which threads insert; one thread makes every test repeatable
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(old)


def clustered(n=600, d=16, classes=60, noise=0.35, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    centres = torch.randn(classes, d, generator=g, dtype=torch.float64)
    x = centres[labels] + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x.to(dtype), labels.numpy()


def brute_force(query, reference, k, exclude_self):
    """The k nearest references of each query by float64 Euclidean distance (self excluded by index)."""
    d = torch.cdist(query.double(), reference.double())
    if exclude_self:
        d[torch.arange(len(query)), torch.arange(len(query))] = float("inf")
    return torch.argsort(d, dim=1, stable=True)[:, :k]


def reference_metrics(knn_idx, qlab, rlab, exclude_self):
    """Per query, written from the definitions: P@1, R@k (a hit in the first k), AP@R and R-precision."""
    out = {"precision_at_1": [], "recall_at_1": [], "recall_at_8": [], "mean_average_precision_at_r": [],
           "r_precision": []}  # fmt: skip
    for i, row in enumerate(knn_idx):
        r = int((rlab == qlab[i]).sum()) - int(exclude_self)
        if r == 0:
            continue
        rel = [rlab[j] == qlab[i] for j in row]
        out["precision_at_1"].append(float(rel[0]))
        out["recall_at_1"].append(float(any(rel[:1])))
        out["recall_at_8"].append(float(any(rel[:8])))
        hits, ap = 0, 0.0
        for pos in range(r):
            if rel[pos]:
                hits += 1
                ap += hits / (pos + 1)
        out["mean_average_precision_at_r"].append(ap / r)
        out["r_precision"].append(sum(rel[:r]) / r)
    return {k: float(np.mean(v)) for k, v in out.items()}


@pytest.mark.parametrize("method", ["exact", "faiss-flat"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_exact_methods_find_the_true_neighbours(method, dtype, one_thread):
    x, _ = clustered(n=300, dtype=dtype)
    k = 7
    _, idx = ScalableKNN(method)(x, k, x, True)
    want = brute_force(x.float(), x.float(), k, True)
    assert (idx == want).float().mean() > 0.999  # float16 input: searched in float32, as the reference
    _, idx2 = ScalableKNN(method)(x[:50], k, x[50:], False)  # query vs a separate reference set
    assert (idx2 == brute_force(x[:50].float(), x[50:].float(), k, False)).float().mean() > 0.999


def test_exact_bounds_its_distance_block_without_changing_the_answer(one_thread):
    x, _ = clustered(n=500)
    small = ScalableKNN("exact", memory_mb=1)
    _, a = small(x, 5, x, True)
    _, b = ScalableKNN("exact")(x, 5, x, True)
    assert torch.equal(a, b)
    big = torch.zeros(600_000, 4)  # 1 MiB over 600k references: batches of one query
    small(big[:3], 1, big, False)
    assert small.last_index == "exact, query batches of 1"


@pytest.mark.parametrize("method", ["faiss-ivf", "faiss-hnsw"])
def test_approximate_methods_recover_most_true_neighbours(method, one_thread):
    x, _ = clustered(n=2000, d=16, classes=100, noise=0.2)
    _, idx = ScalableKNN(method)(x, 5, x, True)
    want = brute_force(x, x, 5, True)
    overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(idx, want)])
    assert overlap > 0.9, overlap
    assert not (idx == torch.arange(2000)[:, None]).any()  # the query itself is never its own neighbour


def test_chunked_metrics_equal_the_definitions_and_the_accuracy_calculator(one_thread):
    x, labels = clustered(n=700, noise=0.9)
    labels[0] = 10_000  # a lone query: excluded from every mean
    k = needed_k(labels, True, len(x))
    idx = brute_force(x, x, k, True)
    per_query = retrieval_metrics(idx, labels, labels, True, chunk=64)
    assert not per_query["valid"][0]
    mine = {m: float(v[per_query["valid"]].mean()) for m, v in per_query.items() if m != "valid"}
    ref = reference_metrics(idx.numpy(), labels, labels, True)
    for m, v in ref.items():
        assert mine[m] == pytest.approx(v, abs=1e-12), m
    pml = RetrievalAccuracyCalculator(include=tuple(ref)).get_accuracy(x.float(), torch.from_numpy(labels))
    for m, v in pml.items():
        assert mine[m] == pytest.approx(v, abs=1e-6), m
    # query-vs-gallery: nothing excluded
    q, g = x[:200], x[200:]
    kq = needed_k(labels[200:], False, len(g))
    idx_q = brute_force(q, g, kq, False)
    pq = retrieval_metrics(idx_q, labels[:200], labels[200:], False)
    ref_q = reference_metrics(idx_q.numpy(), labels[:200], labels[200:], False)
    for m, v in ref_q.items():
        assert float(pq[m][pq["valid"]].mean()) == pytest.approx(v, abs=1e-12), m


@pytest.mark.parametrize("method", KNN_METHODS)
def test_evaluate_embeddings_close_to_exact(method, one_thread):
    x, labels = synthetic(3000, noise=1.0)
    exact, _ = evaluate_embeddings(x, labels, ScalableKNN("exact"))
    got, rows = evaluate_embeddings(x, labels, ScalableKNN(method))
    assert len(rows) == 3000
    for m in ("mean_average_precision_at_r", "recall_at_1"):
        assert abs(got[m].mean() - exact[m].mean()) < 0.02, (method, m)
    sub, rows = evaluate_embeddings(x, labels, ScalableKNN(method), queries=100)
    assert len(rows) == 100 and len(sub["recall_at_1"]) == 100


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="method"):
        ScalableKNN("annoy")
    with pytest.raises(ValueError, match="nprobe"):
        ScalableKNN("faiss-ivf", nprobe=0)
    with pytest.raises(ValueError, match="nlist"):
        ScalableKNN("faiss-ivf", nlist=-3)
    with pytest.raises(ValueError, match="k must be"):
        ScalableKNN("exact")(torch.zeros(4, 2), 4, torch.zeros(4, 2), True)


def test_synthetic_classes_and_scale_script(tmp_path):
    x, labels = synthetic(1000, noise=1.2)
    sizes = np.bincount(labels)
    assert x.shape == (1000, 128) and sizes[:-1].min() >= 5 and sizes.max() <= 20
    assert torch.allclose(x.norm(dim=1), torch.ones(1000), atol=1e-5)
    assert torch.equal(synthetic(1000, noise=1.2)[0], x)  # seeded
    spec = dict(n=400, noise=1.2, sample=100, full_exact=300, threads=1)
    pml = worker(dict(spec, method="pml-default"))  # in this process: PML's AccuracyCalculator() defaults
    ours = evaluate_embeddings(*synthetic(400, 1.2), ScalableKNN("exact"))[0]
    assert pml["metrics"]["mean_average_precision_at_r"] == pytest.approx(ours["mean_average_precision_at_r"].mean())
    assert pml["metrics"]["precision_at_1"] == pytest.approx(ours["precision_at_1"].mean())
    out, js = str(tmp_path / "t.md"), str(tmp_path / "t.json")
    argv = ["--sizes", "400", "--methods", "exact,faiss-hnsw", "--sample", "100", "--full-exact", "300"]
    assert scale_main(argv + ["--out", out, "--json", js, "--threads", "1"]) == 0
    rows = json.load(open(js))["rows"]
    assert [r["method"] for r in rows] == ["exact", "faiss-hnsw"]
    assert rows[0]["queries"] == 100 and rows[1]["queries"] == 400
    assert rows[0]["metrics"] == rows[0]["sample"]  # the exact search ran on the sample only
    assert all(r["peak_rss_mb"] >= r["before_mb"] > 0 and r["seconds"] > 0 for r in rows)
    table = open(out).read()
    assert table.count("\n| 400 | 35 |") == 2 and "+0.00 | +0.00 |" in table  # HNSW finds these neighbours exactly


def test_runner_knn_and_half_precision_embeddings(tmp_path, capsys):
    from benchmarks.results import report
    from benchmarks.run import main

    store = "sqlite:///" + str(tmp_path / "results.db")  # one store, two exports
    tiny = ["--losses", "triplet", "--seeds", "1", "--epochs", "1", "--iterations-per-epoch", "3", "--storage", store]
    assert main(tiny + ["--out", str(tmp_path / "a")]) == 0
    assert main(tiny + ["--out", str(tmp_path / "b"), "--knn", "faiss-hnsw", "--eval-precision", "float16"]) == 0
    assert "1 runs/trials made, 0 reused" in capsys.readouterr().out  # another evaluation: another key
    recs = {r["knn"]: r for d in "ab" for r in report.load_jsonl(os.path.join(str(tmp_path / d), "results.jsonl"))}
    assert set(recs) == {"exact", "faiss-hnsw"}
    assert recs["faiss-hnsw"]["config"]["eval_precision"] == "float16"
    assert "knn" not in recs["exact"]["config"]  # the default keeps the earlier key
    for m in ("mean_average_precision_at_r", "precision_at_1"):  # same training, near-identical evaluation
        assert abs(recs["faiss-hnsw"]["metrics"][m] - recs["exact"]["metrics"][m]) < 0.01, m
