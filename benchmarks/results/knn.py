"""Nearest-neighbour search and retrieval metrics for evaluation at scale.

:class:`ScalableKNN` is a PML ``knn_func`` (``knn(query, k, reference, ref_includes_query) -> (distances, indices)``,
what ``AccuracyCalculator`` and ``InferenceModel`` call) with four methods, chosen by the runner's ``--knn``:

* ``exact``: PML's ``CustomKNN`` with Euclidean ``LpDistance``, its query batch sized so that one batch of
  distances stays within ``memory_mb`` (2048 queries, the earlier fixed batch, up to 16k references at 128 MiB).
* ``faiss-flat``: faiss's exact ``IndexFlatL2`` (BLAS; on the GPU when the embeddings are on CUDA and faiss has
  GPUs).
* ``faiss-ivf``: ``IndexIVFFlat`` with ``nlist`` inverted lists (default 4 sqrt(n)), trained by 10 k-means
  iterations on 40 points per list drawn with a fixed seed, searching ``nprobe`` lists (default 16).
* ``faiss-hnsw``: ``IndexHNSWFlat`` (``M`` 16, efConstruction 40, efSearch 64, at least k). CPU only; its graph
  is built by several threads, so its neighbours may differ slightly from one build to the next.

Queries are searched in chunks, so the float32 copies and the result tables grow with the chunk, not with n;
k is what the metrics need (the largest class, at least 8 for Recall@8), never the whole reference set.

:func:`retrieval_metrics` computes the runner's kNN metrics (P@1, Recall@1/2/4/8 as in the DML papers, MAP@R,
R-precision) from the neighbour indices, in chunks of queries, equal to
:class:`benchmarks.results.metrics.RetrievalAccuracyCalculator` (the tests compare them); :func:`evaluate_embeddings`
runs the search and the metrics in one call, the evaluation that ``benchmarks/eval_scale.py`` measures.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

KNN_METHODS = ("exact", "faiss-flat", "faiss-ivf", "faiss-hnsw")
RECALL_KS = (1, 2, 4, 8)


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss is a dependency of the cpu/gpu extras
        raise ImportError("the faiss-* kNN methods need faiss: install the cpu (faiss-cpu) or gpu extra") from e
    return faiss


class ScalableKNN:
    """A PML ``knn_func`` searching exactly or with a faiss index (see the module docstring).

    Args:
        method: one of ``KNN_METHODS``.
        memory_mb: bound on the distance block of ``exact`` and on each query chunk's float32 copy.
        nlist: IVF lists (default ``4 sqrt(n)``, at most n / 40 so that k-means has 40 points per list).
        nprobe: IVF lists searched per query (default 16).
        hnsw_m, ef_construction, ef_search: HNSW graph degree and beam widths.
        seed: seed of the IVF training sample.
    """

    def __init__(
        self,
        method: str = "exact",
        memory_mb: int = 128,
        nlist: int | None = None,
        nprobe: int = 16,
        hnsw_m: int = 16,
        ef_construction: int = 40,
        ef_search: int = 64,
        seed: int = 0,
    ) -> None:
        if method not in KNN_METHODS:
            raise ValueError(f"method must be one of {KNN_METHODS}, got {method!r}")
        for name, v in (("memory_mb", memory_mb), ("nprobe", nprobe), ("hnsw_m", hnsw_m)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if nlist is not None and (not isinstance(nlist, int) or nlist < 1):
            raise ValueError(f"nlist must be None or an int >= 1, got {nlist!r}")
        self.method = method
        self.memory_mb = memory_mb
        self.nlist = nlist
        self.nprobe = nprobe
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.seed = seed
        self.last_index: str = ""  # what the last call built, for reports

    def __repr__(self) -> str:
        return f"ScalableKNN({self.method!r})"

    def __call__(
        self, query: torch.Tensor, k: int, reference: torch.Tensor | None = None, ref_includes_query: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from pytorch_metric_learning.utils.inference import return_results

        if reference is None:
            reference, ref_includes_query = query, True
        kk = int(k) + (1 if ref_includes_query else 0)
        if not 1 <= kk <= len(reference):
            raise ValueError(f"k must be in [1, {len(reference) - int(ref_includes_query)}], got {k}")
        if self.method == "exact":
            d, i = self._exact(query, reference, kk)
        else:
            d, i = self._faiss(query, reference, kk)
        return return_results(d, i, ref_includes_query)

    def _chunk_rows(self, width: int) -> int:
        return max(1, (self.memory_mb << 20) // (4 * max(1, width)))

    def _exact(self, query: torch.Tensor, reference: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        from pytorch_metric_learning.distances import LpDistance
        from pytorch_metric_learning.utils.inference import CustomKNN

        batch = min(2048, self._chunk_rows(len(reference)))
        knn = CustomKNN(LpDistance(normalize_embeddings=False), batch_size=batch)
        self.last_index = f"exact, query batches of {batch}"
        return knn(query.float(), k, reference.float(), False)  # type: ignore[no-any-return]

    def _build(self, reference: torch.Tensor) -> Any:
        faiss = _faiss()
        n, d = reference.shape
        if self.method == "faiss-flat":
            index = faiss.IndexFlatL2(d)
            self.last_index = "IndexFlatL2"
        elif self.method == "faiss-hnsw":
            index = faiss.IndexHNSWFlat(d, self.hnsw_m)
            index.hnsw.efConstruction = self.ef_construction
            self.last_index = f"IndexHNSWFlat(M={self.hnsw_m}, efConstruction={self.ef_construction})"
        else:
            nlist = self.nlist or int(round(4 * math.sqrt(n)))
            nlist = max(1, min(nlist, n // 40 or 1))
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
            train_n = min(n, 40 * nlist)
            rows = np.random.RandomState(self.seed).choice(n, train_n, replace=False) if train_n < n else None
            sample = reference[torch.from_numpy(np.sort(rows))] if rows is not None else reference
            index.cp.seed = self.seed
            index.cp.niter = 10
            index.train(np.ascontiguousarray(sample.detach().cpu().float().numpy()))
            index.nprobe = min(self.nprobe, nlist)
            self.last_index = f"IndexIVFFlat(nlist={nlist}, nprobe={index.nprobe}, trained on {train_n})"
        step = self._chunk_rows(d)
        for s in range(0, n, step):
            index.add(np.ascontiguousarray(reference[s : s + step].detach().cpu().float().numpy()))
        return index

    def _faiss(self, query: torch.Tensor, reference: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        faiss = _faiss()
        index = self._build(reference)
        if self.method == "faiss-hnsw":
            index.hnsw.efSearch = max(self.ef_search, k)
        elif query.is_cuda and faiss.get_num_gpus() > 0 and k <= 2048:
            index = faiss.index_cpu_to_all_gpus(index)
        n = len(query)
        distances = torch.empty(n, k, dtype=torch.float32)
        indices = torch.empty(n, k, dtype=torch.long)
        step = self._chunk_rows(query.shape[1])
        for s in range(0, n, step):
            d, i = index.search(np.ascontiguousarray(query[s : s + step].detach().cpu().float().numpy()), k)
            distances[s : s + step] = torch.from_numpy(d)
            indices[s : s + step] = torch.from_numpy(i)
        if (indices < 0).any():
            raise RuntimeError(
                f"{self.last_index} returned fewer than k={k} neighbours for some queries; raise nprobe/efSearch"
            )
        return distances.to(query.device), indices.to(query.device)


def needed_k(reference_labels: np.ndarray, ref_includes_query: bool, num_reference: int) -> int:
    """k as :class:`benchmarks.results.metrics.RetrievalAccuracyCalculator` chooses it: the largest class (minus the
    query itself), at least 8, at most the references searchable."""
    self_count = int(ref_includes_query)
    counts = np.unique(reference_labels, return_counts=True)[1]
    need = max(int(counts.max()) - self_count, max(RECALL_KS))
    return max(1, min(need, num_reference - self_count))


def retrieval_metrics(
    knn_indices: torch.Tensor | np.ndarray,
    query_labels: np.ndarray,
    reference_labels: np.ndarray,
    ref_includes_query: bool,
    chunk: int = 65536,
) -> dict[str, np.ndarray]:
    """Per-query P@1, Recall@1/2/4/8, AP@R and R-precision from the neighbours (self excluded), in chunks.

    Returns float arrays of length len(query) under ``precision_at_1``, ``recall_at_{k}``,
    ``mean_average_precision_at_r`` and ``r_precision`` (their means over queries are the metrics), plus ``valid``:
    False for lone queries (no same-class reference), which the means skip as PML skips them.
    """
    idx = knn_indices.cpu().numpy() if torch.is_tensor(knn_indices) else np.asarray(knn_indices)
    qlab = np.asarray(query_labels).reshape(-1)
    rlab = np.asarray(reference_labels).reshape(-1)
    values, counts = np.unique(rlab, return_counts=True)
    pos = np.searchsorted(values, qlab)
    pos_ok = (pos < len(values)) & (values[np.minimum(pos, len(values) - 1)] == qlab)
    r = np.where(pos_ok, counts[np.minimum(pos, len(values) - 1)], 0) - int(ref_includes_query)
    n, k = idx.shape
    out: dict[str, np.ndarray] = {
        name: np.zeros(n) for name in ("precision_at_1", "mean_average_precision_at_r", "r_precision")
    }
    out.update({f"recall_at_{j}": np.zeros(n) for j in RECALL_KS})
    ranks = np.arange(1, k + 1)
    for s in range(0, n, chunk):
        rel = rlab[idx[s : s + chunk]] == qlab[s : s + chunk, None]
        rr = r[s : s + chunk]
        within = ranks[None, :] <= rr[:, None]
        hits = rel & within
        denom = np.maximum(rr, 1)
        prec = np.cumsum(rel, axis=1) / ranks[None, :]
        out["mean_average_precision_at_r"][s : s + chunk] = (prec * hits).sum(1) / denom
        out["r_precision"][s : s + chunk] = hits.sum(1) / denom
        out["precision_at_1"][s : s + chunk] = rel[:, 0]
        for j in RECALL_KS:
            out[f"recall_at_{j}"][s : s + chunk] = rel[:, :j].any(1)
    out["valid"] = r > 0
    return out


def summarize_per_query(per_query: dict[str, np.ndarray], rows: np.ndarray | None = None) -> dict[str, float]:
    """Means over the non-lone queries (optionally over ``rows`` only)."""
    valid = per_query["valid"] if rows is None else per_query["valid"][rows]
    out = {}
    for name, v in per_query.items():
        if name != "valid":
            vv = v if rows is None else v[rows]
            out[name] = float(vv[valid].mean()) if valid.any() else float("nan")
    return out


def evaluate_embeddings(
    embeddings: torch.Tensor, labels: np.ndarray, knn: ScalableKNN, queries: int | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every item as a query against all the others (self excluded): per-query metrics and the query rows.

    ``queries``: search only the first ``queries`` items (the others stay references), e.g. an exact reference
    on a sample; the embeddings are then expected in the order wanted (shuffle the sample to the front).
    """
    labels = np.asarray(labels)
    m = len(embeddings) if queries is None else int(queries)
    k = needed_k(labels, True, len(embeddings))
    _, idx = knn(embeddings[:m], k, embeddings, True)
    return retrieval_metrics(idx, labels[:m], labels, True), np.arange(m)
