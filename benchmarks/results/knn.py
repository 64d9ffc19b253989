"""Nearest-neighbour search and retrieval metrics for evaluation at scale.

:class:`ScalableKNN` is a PML ``knn_func`` (``knn(query, k, reference, ref_includes_query) -> (distances, indices)``,
what ``AccuracyCalculator`` and ``InferenceModel`` call) with four methods, chosen by the runner's ``--knn``:

* ``exact``: PML's ``CustomKNN`` with Euclidean ``LpDistance``, its query batch sized so that one batch of
  distances stays within ``memory_mb`` (2048 queries, the earlier fixed batch, up to 16k references at 128 MiB).
* ``faiss-flat``: faiss's exact ``IndexFlatL2`` (BLAS; on the GPU when the embeddings are on CUDA and faiss has
  GPUs).
* ``faiss-ivf``: ``IndexIVFFlat`` with ``nlist`` inverted lists (default 4 sqrt(n)), trained by 10 k-means
  iterations on 40 points per list drawn with a fixed seed, searching ``nprobe`` lists (default: calibrated).
* ``faiss-hnsw``: ``IndexHNSWFlat`` (default ``M`` 32, efConstruction 200, efSearch calibrated, at least k). CPU
  only; its graph is built by several threads, so its neighbours may differ slightly from one build to the next.

The approximate indexes' settings follow the method on the command line, ``--knn faiss-hnsw:m=48,ef_search=512``
(:func:`parse_knn`; the settings are ``KNN_SETTINGS``). By default their search width (``nprobe``, ``ef_search``)
is **calibrated**: ``calibrate`` queries (1000, drawn with a fixed seed) are searched exactly, and the width is
doubled, from 16 lists or efSearch 64, until the index finds at least ``recall`` (0.98) of their k exact
neighbours, or the width reaches every list (IVF) or 4096 (HNSW). A fixed width (``ef_search=256``) skips the
calibration.

Queries are searched in chunks, so the float32 copies and the result tables grow with the chunk, not with n;
k is what the metrics need (the largest class, at least 8 for Recall@8), never the whole reference set.

:func:`retrieval_metrics` computes the runner's kNN metrics (P@1, Recall@1/2/4/8 as in the DML papers, MAP@R,
R-precision) from the neighbour indices, in chunks of queries, equal to
:class:`benchmarks.results.metrics.RetrievalAccuracyCalculator` (the tests compare them); :func:`evaluate_embeddings`
runs the search and the metrics in one call, the evaluation that ``benchmarks/eval_scale.py`` measures.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from typing import Any

import numpy as np
import torch

KNN_METHODS = ("exact", "faiss-flat", "faiss-ivf", "faiss-hnsw")
RECALL_KS = (1, 2, 4, 8)
AUTO = "auto"
MAX_EF_SEARCH = 4096
#: the settings each method takes on the command line, and their defaults ("auto": calibrated, or 4 sqrt(n) lists)
KNN_SETTINGS: dict[str, dict[str, int | float | str]] = {
    "exact": {},
    "faiss-flat": {},
    "faiss-ivf": {"nlist": AUTO, "nprobe": AUTO, "recall": 0.98, "calibrate": 1000},
    "faiss-hnsw": {"m": 32, "ef_construction": 200, "ef_search": AUTO, "recall": 0.98, "calibrate": 1000},
}
_AUTO_OK = ("nlist", "nprobe", "ef_search")  # the settings that may be "auto"


def parse_knn(spec: str) -> tuple[str, dict[str, int | float | str]]:
    """``"faiss-hnsw:m=48,ef_search=512"`` -> ``("faiss-hnsw", every setting of the method, defaults filled in)``.

    Raises ValueError naming the method or the setting that is unknown or out of range.
    """
    if not isinstance(spec, str):
        raise TypeError(f"knn must be a string like 'faiss-hnsw:ef_search=256', got {type(spec).__name__}")
    method, _, rest = spec.strip().partition(":")
    method = method.strip()
    if method not in KNN_METHODS:
        raise ValueError(f"knn method must be one of {'|'.join(KNN_METHODS)}, got {method!r}")
    settings = dict(KNN_SETTINGS[method])
    seen: set[str] = set()
    for item in (t.strip() for t in rest.split(",")) if rest.strip() else ():
        name, eq, text = (t.strip() for t in item.partition("="))
        if name not in settings:
            takes = ", ".join(KNN_SETTINGS[method]) or "no settings"
            raise ValueError(f"knn setting {name!r}: {method} takes {takes}")
        if not eq or not text:
            raise ValueError(f"knn setting {name!r}: expected {name}=VALUE")
        if name in seen:
            raise ValueError(f"knn setting {name!r} given twice")
        seen.add(name)
        settings[name] = _setting_value(name, text)
    return method, settings


def _setting_value(name: str, text: str) -> int | float | str:
    if text == AUTO and name in _AUTO_OK:
        return AUTO
    if name == "recall":
        try:
            v = float(text)
        except ValueError:
            v = float("nan")
        if not 0.0 < v <= 1.0:
            raise ValueError(f"knn setting recall must be a number in (0, 1], got {text!r}")
        return v
    lowest = 2 if name == "m" else 1
    if not re.fullmatch(r"\d+", text) or int(text) < lowest:
        auto = " or auto" if name in _AUTO_OK else ""
        raise ValueError(f"knn setting {name} must be an integer >= {lowest}{auto}, got {text!r}")
    return int(text)


def canonical_knn(spec: str) -> str:
    """The method with every setting spelled out (defaults included), the form stored in the result key and the
    record, so that a changed setting or default is a new result. ``exact`` and ``faiss-flat`` take none; with a
    fixed search width the calibration's ``recall`` and ``calibrate`` play no part and are left out."""
    method, settings = parse_knn(spec)
    if not settings:
        return method
    if settings["ef_search" if method == "faiss-hnsw" else "nprobe"] != AUTO:  # a fixed width: no calibration
        del settings["recall"], settings["calibrate"]
    return method + ":" + ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items())


def knn_argument(text: str) -> str:
    """argparse ``type`` of the runner's ``--knn``: the canonical spec, or a one-line error (exit code 2)."""
    try:
        return canonical_knn(text)
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
        nlist: IVF lists (None: ``4 sqrt(n)``; at most n / 40 so that k-means has 40 points per list).
        nprobe: IVF lists searched per query (None: calibrated).
        hnsw_m, ef_construction, ef_search: HNSW graph degree and beam widths (``ef_search`` None: calibrated).
        recall: the calibration's target, the share of the exact k neighbours that the index must find.
        calibrate: queries searched exactly for the calibration (drawn with ``seed``).
        seed: seed of the IVF training sample and of the calibration queries.

    After each call, ``last_index`` describes the index (with the calibrated width and its recall) and
    ``last_timings`` gives the seconds spent building, calibrating and searching.
    """

    def __init__(
        self,
        method: str = "exact",
        *,
        memory_mb: int = 128,
        nlist: int | None = None,
        nprobe: int | None = None,
        hnsw_m: int = 32,
        ef_construction: int = 200,
        ef_search: int | None = None,
        recall: float = 0.98,
        calibrate: int = 1000,
        seed: int = 0,
    ) -> None:
        if method not in KNN_METHODS:
            raise ValueError(f"method must be one of {KNN_METHODS}, got {method!r}")
        for name, v in (
            ("memory_mb", memory_mb),
            ("hnsw_m", hnsw_m),
            ("ef_construction", ef_construction),
            ("calibrate", calibrate),
        ):
            if not isinstance(v, int) or isinstance(v, bool) or v < (2 if name == "hnsw_m" else 1):
                raise ValueError(f"{name} must be an int >= {2 if name == 'hnsw_m' else 1}, got {v!r}")
        for name, w in (("nlist", nlist), ("nprobe", nprobe), ("ef_search", ef_search)):
            if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 1):
                raise ValueError(f"{name} must be None (automatic) or an int >= 1, got {w!r}")
        if not isinstance(recall, (int, float)) or isinstance(recall, bool) or not 0.0 < recall <= 1.0:
            raise ValueError(f"recall must be a number in (0, 1], got {recall!r}")
        self.method = method
        self.memory_mb = memory_mb
        self.nlist = nlist
        self.nprobe = nprobe
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.recall = float(recall)
        self.calibrate = calibrate
        self.seed = seed
        self.last_index: str = ""  # what the last call built, for reports
        self.last_timings: dict[str, float] = {}
        self.last_width: int | None = None  # the nprobe or efSearch the last call searched with
        self.last_recall: float | None = None  # the calibration's recall of the exact neighbours (None: no calibration)

    @classmethod
    def from_spec(cls, spec: str, **kwargs: Any) -> ScalableKNN:
        """From the runner's ``--knn`` text, e.g. ``"faiss-hnsw:m=48,ef_search=512"`` (:func:`parse_knn`)."""
        method, s = parse_knn(spec)

        def width(name: str) -> int | None:
            return None if s[name] == AUTO else int(s[name])

        if method == "faiss-ivf":
            kwargs.update(nlist=width("nlist"), nprobe=width("nprobe"))
        elif method == "faiss-hnsw":
            kwargs.update(hnsw_m=int(s["m"]), ef_construction=int(s["ef_construction"]), ef_search=width("ef_search"))
        if "recall" in s:
            kwargs.update(recall=float(s["recall"]), calibrate=int(s["calibrate"]))
        return cls(method, **kwargs)

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
        self.last_timings, self.last_width, self.last_recall = {}, None, None
        if self.method == "exact":
            t0 = time.perf_counter()
            d, i = self._exact(query, reference, kk)
            self.last_timings = {"build": 0.0, "calibrate": 0.0, "search": time.perf_counter() - t0}
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
            self.last_index = f"IndexIVFFlat(nlist={nlist}, trained on {train_n})"
        step = self._chunk_rows(d)
        for s in range(0, n, step):
            index.add(np.ascontiguousarray(reference[s : s + step].detach().cpu().float().numpy()))
        return index

    def _set_width(self, index: Any, width: int) -> None:
        if self.method == "faiss-hnsw":
            index.hnsw.efSearch = width
        else:
            index.nprobe = width

    def _calibrate(self, index: Any, query: torch.Tensor, reference: torch.Tensor, k: int) -> tuple[int, float]:
        """The smallest doubling of the search width whose neighbours of a query sample include ``recall`` of the
        exact ones (or the largest width): (width, recall reached)."""
        faiss = _faiss()
        if self.method == "faiss-hnsw":
            width, top = max(64, k), max(MAX_EF_SEARCH, k)
        else:
            width, top = min(16, index.nlist), index.nlist
        m = min(len(query), self.calibrate)
        rows = np.sort(np.random.RandomState(self.seed).choice(len(query), m, replace=False))
        q = np.ascontiguousarray(query[torch.from_numpy(rows)].detach().cpu().float().numpy())
        flat = faiss.IndexFlatL2(reference.shape[1])
        step = self._chunk_rows(reference.shape[1])
        for s in range(0, len(reference), step):
            flat.add(np.ascontiguousarray(reference[s : s + step].detach().cpu().float().numpy()))
        _, want = flat.search(q, k)
        del flat
        while True:
            self._set_width(index, width)
            _, got = index.search(q, k)
            found = sum(len(np.intersect1d(a, b[b >= 0])) for a, b in zip(want, got)) / want.size
            if found >= self.recall or width >= top:
                return width, float(found)
            width = min(2 * width, top)

    def _faiss(self, query: torch.Tensor, reference: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        faiss = _faiss()
        t0 = time.perf_counter()
        index = self._build(reference)
        t1 = time.perf_counter()
        if self.method != "faiss-flat":
            fixed = self.ef_search if self.method == "faiss-hnsw" else self.nprobe
            if fixed is None:
                width, found = self._calibrate(index, query, reference, k)
                self.last_recall = found
                m = min(len(query), self.calibrate)
                how = f"calibrated: recall {found:.3f} of {k} exact neighbours on {m} queries"
                if found < self.recall:
                    how += f", below the target {self.recall:g}"
            else:
                width = max(fixed, k) if self.method == "faiss-hnsw" else min(fixed, index.nlist)
                how = "fixed"
            self._set_width(index, width)
            self.last_width = width
            name = "efSearch" if self.method == "faiss-hnsw" else "nprobe"
            self.last_index = f"{self.last_index[:-1]}, {name}={width} ({how}))"
        t2 = time.perf_counter()
        if self.method != "faiss-hnsw" and query.is_cuda and faiss.get_num_gpus() > 0 and k <= 2048:
            index = faiss.index_cpu_to_all_gpus(index)
        n = len(query)
        distances = torch.empty(n, k, dtype=torch.float32)
        indices = torch.empty(n, k, dtype=torch.long)
        step = self._chunk_rows(query.shape[1])
        for s in range(0, n, step):
            d, i = index.search(np.ascontiguousarray(query[s : s + step].detach().cpu().float().numpy()), k)
            distances[s : s + step] = torch.from_numpy(d)
            indices[s : s + step] = torch.from_numpy(i)
        self.last_timings = {"build": t1 - t0, "calibrate": t2 - t1, "search": time.perf_counter() - t2}
        if (indices < 0).any():
            raise RuntimeError(
                f"{self.last_index} returned fewer than k={k} neighbours for some queries; raise nprobe/ef_search"
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
