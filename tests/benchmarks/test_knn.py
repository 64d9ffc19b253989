"""Evaluation at scale: ScalableKNN and the chunked retrieval metrics against slow references from the math."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from benchmarks.eval_scale import main as scale_main
from benchmarks.eval_scale import synthetic, worker
from benchmarks.results.knn import (
    KNN_METHODS,
    ScalableKNN,
    canonical_knn,
    evaluate_embeddings,
    needed_k,
    parse_knn,
    retrieval_metrics,
)
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


def test_index_settings_parse_with_defaults_and_name_the_bad_setting():
    assert parse_knn("exact") == ("exact", {})
    method, s = parse_knn(" faiss-hnsw : ef_search=512 , m=48 ")
    assert method == "faiss-hnsw"
    assert s == {"m": 48, "ef_construction": 200, "ef_search": 512, "recall": 0.98, "calibrate": 1000}
    assert canonical_knn("faiss-ivf") == "faiss-ivf:nlist=auto,nprobe=auto,recall=0.98,calibrate=1000"
    assert canonical_knn("faiss-ivf:nprobe=64,nlist=100") == "faiss-ivf:nlist=100,nprobe=64"  # fixed: no calibration
    assert canonical_knn("faiss-hnsw:recall=0.9") == canonical_knn("faiss-hnsw:recall=0.90,ef_search=auto")
    knn = ScalableKNN.from_spec("faiss-hnsw:m=8,ef_construction=50,ef_search=100")
    assert (knn.method, knn.hnsw_m, knn.ef_construction, knn.ef_search) == ("faiss-hnsw", 8, 50, 100)
    knn = ScalableKNN.from_spec("faiss-ivf:nlist=20,recall=0.5,calibrate=7")
    assert (knn.nlist, knn.nprobe, knn.recall, knn.calibrate) == (20, None, 0.5, 7)
    bad = {
        "faiss-hnsw:efsearch=3": "'efsearch'",
        "faiss-hnsw:m=1": "m must be an integer >= 2",
        "faiss-hnsw:ef_construction=auto": "ef_construction must be an integer >= 1, got 'auto'",
        "faiss-ivf:nprobe=-2": "nprobe must be an integer >= 1 or auto",
        "faiss-ivf:recall=0": "recall must be a number in \\(0, 1\\]",
        "faiss-ivf:recall=nan": "recall",
        "faiss-ivf:nprobe=4,nprobe=8": "'nprobe' given twice",
        "faiss-ivf:nprobe=": "nprobe=VALUE",
        "exact:memory_mb=4": "exact takes no settings",
        "hnsw": "knn method",
    }
    for spec, msg in bad.items():
        with pytest.raises(ValueError, match=msg):
            parse_knn(spec)
    with pytest.raises(TypeError, match="knn"):
        parse_knn(None)  # type: ignore[arg-type]


def _overlap(idx, want):
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / len(b) for a, b in zip(idx, want)]))


@pytest.mark.parametrize("method", ["faiss-ivf", "faiss-hnsw"])
def test_calibration_widens_the_search_until_the_recall_target(method, one_thread):
    # unclustered 32-d points: a narrow search misses neighbours, so the calibration has work to do
    x = torch.randn(2000, 32, generator=torch.Generator().manual_seed(0))
    k = 10
    want = brute_force(x, x, k, True)
    narrow = dict(nlist=32, nprobe=2) if method == "faiss-ivf" else dict(hnsw_m=8, ef_construction=16, ef_search=1)
    knn = ScalableKNN(method, **narrow)
    _, idx = knn(x, k, x, True)
    assert knn.last_recall is None and _overlap(idx, want) < 0.8  # a fixed, narrow width: far from exact
    assert knn.last_width == (2 if method == "faiss-ivf" else k + 1)  # efSearch is at least k (self included)
    auto = dict(narrow, nprobe=None) if method == "faiss-ivf" else dict(narrow, ef_search=None)
    knn = ScalableKNN(method, recall=0.95, calibrate=2000, **auto)  # calibrated on every query
    _, idx = knn(x, k, x, True)
    found = _overlap(idx, want)
    assert knn.last_recall is not None and knn.last_recall >= 0.95 and found >= 0.95
    assert abs(knn.last_recall - found) < 0.01  # the calibration's recall is the recall of the search it set
    assert knn.last_width > (2 if method == "faiss-ivf" else 64)
    assert f"={knn.last_width} (calibrated: recall" in knn.last_index
    assert set(knn.last_timings) == {"build", "calibrate", "search"} and knn.last_timings["calibrate"] > 0
    # a sample of the queries calibrates too; IVF's widest search probes every list, an exhaustive search
    knn = ScalableKNN("faiss-ivf", nlist=16, recall=1.0, calibrate=300)
    _, idx = knn(x[:500], k, x, False)
    assert knn.last_width == 16 and knn.last_recall == 1.0 and _overlap(idx, brute_force(x[:500], x, k, False)) == 1


def test_calibration_that_misses_its_target_says_so(monkeypatch, one_thread):
    import benchmarks.results.knn as knn_module

    monkeypatch.setattr(knn_module, "MAX_EF_SEARCH", 64)  # the widest search allowed: the first one tried
    x = torch.randn(3000, 32, generator=torch.Generator().manual_seed(1))
    knn = ScalableKNN("faiss-hnsw", hnsw_m=2, ef_construction=4, recall=1.0)
    knn(x, 10, x, True)
    assert knn.last_width == 64 and knn.last_recall is not None and knn.last_recall < 1.0
    assert knn.last_index.endswith(
        f"recall {knn.last_recall:.3f} of 11 exact neighbours on 1000 queries, below the target 1))"
    )


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
    ivf = worker(dict(spec, method="faiss-ivf:nlist=8,nprobe=8", approx_all=True))  # every query, exhaustive IVF
    assert ivf["queries"] == 400 and ivf["knn"] == "faiss-ivf:nlist=8,nprobe=8" and ivf["calibration_recall"] is None
    assert ivf["metrics"]["mean_average_precision_at_r"] == pytest.approx(ours["mean_average_precision_at_r"].mean())
    out, js = str(tmp_path / "t.md"), str(tmp_path / "t.json")
    argv = ["--sizes", "400", "--methods", "exact,faiss-hnsw", "--sample", "100", "--full-exact", "300"]
    assert scale_main(argv + ["--out", out, "--json", js, "--threads", "1"]) == 0
    rows = json.load(open(js))["rows"]
    assert [r["method"] for r in rows] == ["exact", "faiss-hnsw"]
    assert rows[0]["queries"] == rows[1]["queries"] == 100  # both on the same sample of queries
    assert rows[1]["knn"] == canonical_knn("faiss-hnsw") and rows[1]["width"] == 64  # calibrated: the first width
    assert set(rows[1]["timings"]) == {"build", "calibrate", "search"}
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
    hnsw = "faiss-hnsw:m=32,ef_construction=200,ef_search=auto,recall=0.98,calibrate=1000"  # settings spelled out
    assert canonical_knn("faiss-hnsw") == hnsw
    recs = {r["knn"]: r for d in "ab" for r in report.load_jsonl(os.path.join(str(tmp_path / d), "results.jsonl"))}
    assert set(recs) == {"exact", hnsw}
    assert recs[hnsw]["config"]["eval_precision"] == "float16" and recs[hnsw]["config"]["knn"] == hnsw
    assert "knn" not in recs["exact"]["config"]  # the default keeps the earlier key
    for m in ("mean_average_precision_at_r", "precision_at_1"):  # same training, near-identical evaluation
        assert abs(recs[hnsw]["metrics"][m] - recs["exact"]["metrics"][m]) < 0.01, m
    # index settings on the command line: a new key, recorded; the same settings in another order: reused
    fixed = ["--knn", "faiss-hnsw:ef_search=32,m=8", "--eval-precision", "float16"]
    assert main(tiny + ["--out", str(tmp_path / "c")] + fixed) == 0
    assert "1 runs/trials made, 0 reused" in capsys.readouterr().out
    (rec,) = report.load_jsonl(os.path.join(str(tmp_path / "c"), "results.jsonl"))
    assert rec["knn"] == "faiss-hnsw:m=8,ef_construction=200,ef_search=32"
    assert main(tiny + ["--out", str(tmp_path / "d"), "--knn", "faiss-hnsw:m=8,ef_search=32", *fixed[2:]]) == 0
    assert "0 runs/trials made, 1 reused" in capsys.readouterr().out


@pytest.mark.parametrize(
    "spec,word",
    [
        ("faiss-hnsw:ef_serch=32", "'ef_serch'"),
        ("faiss-hnsw:ef_search=0", "ef_search"),
        ("faiss-ivf:nprobe=many", "nprobe"),
        ("faiss-hnsw:recall=1.5", "recall"),
        ("faiss-flat:nprobe=4", "'nprobe'"),
        ("faiss-hnsw:m", "'m'"),
        ("annoy", "method"),
    ],
)
def test_runner_rejects_bad_index_settings_before_training(spec, word, tmp_path, capsys):
    from benchmarks.run import main

    with pytest.raises(SystemExit) as exc:
        main(["--losses", "triplet", "--seeds", "1", "--out", str(tmp_path / "o"), "--knn", spec])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--knn" in err and word in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()  # nothing ran, nothing written
