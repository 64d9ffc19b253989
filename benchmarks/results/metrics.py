"""Retrieval metrics for the benchmark: PML's AccuracyCalculator plus Recall@k as the DML papers define it.

Recall@k in the DML papers (the lifted-structure benchmark paper of CVPR 2016 onwards) is the fraction of queries
that have **at least one** same-class item among their k nearest neighbours (the query itself excluded). It is not
PML's precision@k.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import numpy as np
import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.utils import accuracy_calculator as ac
from pytorch_metric_learning.utils.inference import CustomKNN

RECALL_KS = (1, 2, 4, 8)
METRICS = (
    "precision_at_1",
    "recall_at_1",
    "recall_at_2",
    "recall_at_4",
    "recall_at_8",
    "mean_average_precision_at_r",
    "r_precision",
    "NMI",
)
SHORT_NAMES = {
    "precision_at_1": "P@1",
    "recall_at_1": "R@1",
    "recall_at_2": "R@2",
    "recall_at_4": "R@4",
    "recall_at_8": "R@8",
    "mean_average_precision_at_r": "MAP@R",
    "r_precision": "RP",
    "NMI": "NMI",
}


def recall_at_k(knn_labels: torch.Tensor, query_labels: torch.Tensor, k: int) -> float:
    """Fraction of queries with at least one same-label item among the first k neighbours."""
    hit = (knn_labels[:, :k] == query_labels[:, None]).any(dim=1)
    return hit.double().mean().item()


def kmeans_func(x: torch.Tensor, k: int) -> torch.Tensor:
    """k-means cluster ids: faiss when importable and the set is large enough for it (>= 39 points per centroid,
    below which faiss warns), otherwise scikit-learn; both seeded, so NMI is deterministic."""
    n = x.shape[0]
    try:
        import faiss  # noqa: F401

        use_faiss = n >= 39 * k
    except ImportError:
        use_faiss = False
    if use_faiss:
        from pytorch_metric_learning.utils.inference import FaissKMeans

        return FaissKMeans(niter=20, seed=1234)(x, k)
    from sklearn.cluster import KMeans

    ids = KMeans(n_clusters=k, n_init=1, random_state=0).fit_predict(x.detach().cpu().double().numpy())
    return torch.as_tensor(ids, device=x.device)


class RetrievalAccuracyCalculator(ac.AccuracyCalculator):
    """``AccuracyCalculator`` with ``recall_at_{1,2,4,8}`` (DML-paper Recall@k) next to PML's metrics.

    k is chosen so that every metric is exact: at least the largest class size (MAP@R, R-precision) and at least
    8 (Recall@8), capped by the reference size. Lone queries (no same-class reference) are excluded from Recall@k
    as PML excludes them from its metrics.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("include", METRICS)
        kwargs.setdefault("kmeans_func", kmeans_func)
        kwargs.setdefault("knn_func", CustomKNN(LpDistance(normalize_embeddings=False), batch_size=2048))
        super().__init__(*args, **kwargs)

    def requires_knn(self):
        return super().requires_knn() + [f"recall_at_{k}" for k in RECALL_KS]

    def determine_k(self, bin_counts, num_reference_embeddings, ref_includes_query):
        self_count = int(ref_includes_query)
        need = max(int(torch.max(bin_counts).item()) - self_count, max(RECALL_KS))
        return max(1, min(need, num_reference_embeddings - self_count))

    def _recall(self, k, knn_labels, query_labels, not_lone_query_mask, label_counts):
        knn_labels, query_labels = ac.try_getting_not_lone_labels(knn_labels, query_labels, not_lone_query_mask)
        if knn_labels is None:
            return ac.nan_accuracy(label_counts[0], self.return_per_class)
        return recall_at_k(knn_labels, query_labels, k)

    def calculate_recall_at_1(self, knn_labels, query_labels, not_lone_query_mask, label_counts, **kwargs):
        return self._recall(1, knn_labels, query_labels, not_lone_query_mask, label_counts)

    def calculate_recall_at_2(self, knn_labels, query_labels, not_lone_query_mask, label_counts, **kwargs):
        return self._recall(2, knn_labels, query_labels, not_lone_query_mask, label_counts)

    def calculate_recall_at_4(self, knn_labels, query_labels, not_lone_query_mask, label_counts, **kwargs):
        return self._recall(4, knn_labels, query_labels, not_lone_query_mask, label_counts)

    def calculate_recall_at_8(self, knn_labels, query_labels, not_lone_query_mask, label_counts, **kwargs):
        return self._recall(8, knn_labels, query_labels, not_lone_query_mask, label_counts)


class NAMRAccuracyCalculator(RetrievalAccuracyCalculator):
    """Metrics for packed NAMR embeddings ``[x || s]``, both ways: plain Euclidean retrieval on the sample
    embedding x under ``plain_*`` keys, retrieval re-ranked by the structure embedding under ``reranked_*`` keys,
    and the entry's default (``main``) under the bare keys. NMI clusters x only.

    Args:
        embedding_size: d, the width of x (the packed width is 2d).
        rerank_knn: the re-ranking ``knn_func`` (``NAMRReRankKNN``).
        plain_knn: a ``knn_func`` on packed input that ranks by x only (``NAMRReRankKNN`` in plain mode), or
            ``None`` to slice x and use Euclidean ``CustomKNN``.
        main: ``"rerank"`` or ``"plain"``: which retrieval the bare metric keys report.
    """

    def __init__(
        self,
        embedding_size: int,
        rerank_knn: Callable,
        plain_knn: Callable | None = None,
        main: str = "rerank",
        **kwargs,
    ):
        if main not in ("rerank", "plain"):
            raise ValueError(f"main must be 'rerank' or 'plain', got {main!r}")
        self.embedding_size = int(embedding_size)
        self.main = main
        d = self.embedding_size
        base_plain = CustomKNN(LpDistance(normalize_embeddings=False), batch_size=2048)
        self.plain_knn = plain_knn or (lambda q, k, r, inc: base_plain(q[:, :d], k, r[:, :d], inc))
        self.rerank_knn = rerank_knn
        self.main_knn: Callable = rerank_knn if main == "rerank" else self.plain_knn
        self.other_knn: Callable = self.plain_knn if main == "rerank" else rerank_knn
        kwargs["knn_func"] = self.main_knn
        kwargs["kmeans_func"] = lambda x, k: kmeans_func(x[:, :d], k)
        super().__init__(**kwargs)

    def get_accuracy(
        self,
        query,
        query_labels,
        reference=None,
        reference_labels=None,
        ref_includes_query=False,
        include=(),
        exclude=(),
    ):
        if query.shape[1] != 2 * self.embedding_size:
            raise ValueError(
                f"NAMR embeddings must be packed [x || s] of width {2 * self.embedding_size}, got {query.shape[1]}"
            )
        out = super().get_accuracy(
            query, query_labels, reference, reference_labels, ref_includes_query, include, exclude
        )
        knn_metrics = [m for m in self.get_curr_metrics() if m in self.requires_knn()]
        self.knn_func = self.other_knn
        try:
            other = super().get_accuracy(
                query, query_labels, reference, reference_labels, ref_includes_query, include=tuple(knn_metrics)
            )
        finally:
            self.knn_func = self.main_knn
            self.curr_function_dict = self.get_function_dict(include, exclude)
        main = {k: out[k] for k in other if k in out}
        plain, reranked = (other, main) if self.main == "rerank" else (main, other)
        out.update({f"plain_{k}": v for k, v in plain.items()})
        out.update({f"reranked_{k}": v for k, v in reranked.items()})
        return out


def summarize(accuracies: dict, metrics: Sequence[str] = METRICS) -> dict:
    """Pick the metric values out of a tester's accuracy dict (keys like 'precision_at_1_level0')."""
    out = {}
    for key, v in accuracies.items():
        if key == "epoch":
            continue
        base = key[: -len("_level0")] if key.endswith("_level0") else key
        if isinstance(v, (float, int, np.floating)):
            out[base] = float(v)
    return out
