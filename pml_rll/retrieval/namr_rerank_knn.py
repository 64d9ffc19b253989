"""NAMRReRankKNN: index search on the sample embedding, re-ranked by the query's structure embedding."""

from __future__ import annotations

import warnings

import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.utils.inference import CustomKNN

from ..functional import namr as F_namr

try:  # faiss is optional; PML's FaissKNN needs it
    import faiss  # noqa: F401

    _HAS_FAISS = True
except ImportError:  # pragma: no cover - depends on the environment
    _HAS_FAISS = False


def default_base_knn():
    """``FaissKNN()`` (flat L2 index) when faiss imports, else ``CustomKNN(LpDistance(normalize_embeddings=False))``."""
    if _HAS_FAISS:
        from pytorch_metric_learning.utils.inference import FaissKNN

        return FaissKNN()
    return CustomKNN(LpDistance(normalize_embeddings=False))


class NAMRReRankKNN:
    """A PML ``knn_func`` for packed NAMR embeddings: Euclidean candidates on x, query-weighted re-ranking.

    Paper: NAMR (TCSVT 2022) claims existing indexes work unmodified; the NASA evaluation code does it
    in two stages (spec §1.3 d, §3.5): (1) the K_c nearest references by plain Euclidean distance on the
    sample embeddings x; (2) those K_c re-ranked by ``sum_k s_qk (x_qk - x_jk)^2`` using only the
    query's structure embedding s_q. The index stores only x.

    ``knn_func(query, k, reference, ref_includes_query) -> (distances, indices)`` as PML's
    ``AccuracyCalculator`` and ``InferenceModel`` expect. Queries are packed ``[x || s]`` (width 2d);
    references may be packed or sample-only (width d). When ``ref_includes_query`` is True the first
    ``len(query)`` references are the queries (PML's convention) and self-matches are excluded.

    Re-ranking distance (``"rerank"`` and ``"exhaustive"``), with ``w = (1 - blend) + blend * s``:

    * ``weighting="query"`` (default, NASA): ``sum_k w_qk (x_qk - x_jk)^2``, the query's s only; the index
      stores only x.
    * ``weighting="symmetric"`` (a choice; not in NASA's code): ``sum_k (w_qk + w_jk) / 2 (x_qk - x_jk)^2``, the
      query's and the candidate's structure embeddings; references must then be packed (the index stores s too).
    * ``blend`` in [0, 1] (a choice): 1 (default, NASA) is the structure-weighted distance alone, 0 the plain
      squared Euclidean distance, in between ``(1 - blend) |x_q - x_j|^2 + blend * d_w``.

    Modes:

    * ``"rerank"`` (default): K_c = max(k, num_candidates) candidates (capped at the gallery size) are
      re-ranked; the returned distances are the structure-weighted squared distances. Ties keep the
      Euclidean order. Re-ranking only permutes the top K_c, so R@K_c equals the plain one.
    * ``"plain"``: the Euclidean order of ``base_knn`` on x (the "NAMR" numbers without re-ranking), with
      ``base_knn``'s distances, so one evaluation can report both.
    * ``"exhaustive"``: every reference scored by the structure-weighted distance (not index-friendly;
      equal to ``"rerank"`` with ``num_candidates`` >= the gallery size).

    For ``InferenceModel``: ``train(embeddings)`` / ``add(embeddings)`` store the reference sample
    embeddings; a call with ``reference=None`` searches them.

    Args:
        embedding_size: d.
        num_candidates: K_c (NASA: 32, the largest recall K).
        base_knn: knn_func used for the candidate search on x; default :func:`default_base_knn` (faiss flat
            L2 when importable, else PML's ``CustomKNN(LpDistance(normalize_embeddings=False))``).
        mode: "rerank", "plain" or "exhaustive".
        weighting: "query" (NASA) or "symmetric", see above.
        blend: weight of the structure-weighted distance against the plain one, in [0, 1] (NASA: 1).
        normalize_sample: L2-normalise x (queries and references) before searching and re-ranking. Use it
            when x was trained by a loss on normalised embeddings (cosine geometry: MultiSimilarity, PML's
            default ``LpDistance``, RankedListLoss), so that retrieval ranks in the geometry the loss shaped;
            ``NAMRLoss.structure_geometry == "l2"`` says so. NASA's triplet recipe uses raw x (False).
    """

    MODES = ("rerank", "plain", "exhaustive")
    WEIGHTINGS = ("query", "symmetric")

    def __init__(
        self,
        embedding_size: int,
        num_candidates: int = 32,
        base_knn=None,
        mode: str = "rerank",
        normalize_sample: bool = False,
        weighting: str = "query",
        blend: float = 1.0,
    ):
        if not isinstance(embedding_size, int) or isinstance(embedding_size, bool) or embedding_size < 1:
            raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
        if not isinstance(num_candidates, int) or isinstance(num_candidates, bool) or num_candidates < 1:
            raise ValueError(f"num_candidates must be a positive int, got {num_candidates!r}")
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if base_knn is not None and not callable(base_knn):
            raise TypeError(f"base_knn must be a callable knn_func, got {type(base_knn).__name__}")
        if weighting not in self.WEIGHTINGS:
            raise ValueError(f"weighting must be one of {self.WEIGHTINGS}, got {weighting!r}")
        if isinstance(blend, bool) or not isinstance(blend, (int, float)) or not 0.0 <= blend <= 1.0:
            raise ValueError(f"blend must be a number in [0, 1], got {blend!r}")
        self.weighting = weighting
        self.blend = float(blend)
        self.embedding_size = embedding_size
        self.num_candidates = num_candidates
        self.base_knn = default_base_knn() if base_knn is None else base_knn
        self.mode = mode
        self.normalize_sample = bool(normalize_sample)
        self.reference_x: torch.Tensor | None = None
        self.reference_s: torch.Tensor | None = None

    # -- InferenceModel support -------------------------------------------------------------------
    def train(self, embeddings: torch.Tensor) -> None:
        self.reset()
        self.add(embeddings)

    def add(self, embeddings: torch.Tensor) -> None:
        embeddings = torch.as_tensor(embeddings)
        new = self._ref_sample(embeddings).detach()
        new_s = self._ref_structure(embeddings)
        if self.reference_x is not None and (new_s is None) != (self.reference_s is None):
            raise ValueError("add(): mix of packed and sample-only reference embeddings")
        if self.reference_x is None:
            self.reference_x, self.reference_s = new, new_s
        else:
            self.reference_x = torch.cat([self.reference_x, new.to(self.reference_x)])
            if new_s is not None:
                self.reference_s = torch.cat([self.reference_s, new_s.to(self.reference_s)])

    def reset(self) -> None:
        self.reference_x = None
        self.reference_s = None

    # -- helpers ----------------------------------------------------------------------------------
    def _ref_sample(self, reference: torch.Tensor) -> torch.Tensor:
        return F_namr.sample_part(reference, self.embedding_size, "reference")

    def _ref_structure(self, reference: torch.Tensor) -> torch.Tensor | None:
        """The structure part of packed references, None for sample-only ones."""
        if reference.shape[1] == 2 * self.embedding_size:
            return reference[:, self.embedding_size :].detach()
        return None

    @staticmethod
    def _warn_if_normalised(query: torch.Tensor) -> None:
        # Every packed row having unit L2 norm means the caller normalised [x || s] as a whole (e.g. a PML
        # tester with the default normalize_embeddings=True), which corrupts both x and s.
        if query.shape[0] >= 2:
            norms = query.detach().norm(dim=1)
            if bool(((norms - 1).abs() < 1e-4).all()):
                warnings.warn(
                    "NAMRReRankKNN received packed embeddings that all have unit L2 norm: they were probably "
                    "normalised as a whole. Build testers/InferenceModel with normalize_embeddings=False.",
                    UserWarning,
                    stacklevel=3,
                )

    def __call__(
        self, query: torch.Tensor, k: int, reference: torch.Tensor | None = None, ref_includes_query: bool = False
    ):
        qx, qs = F_namr.split_packed(query, self.embedding_size)
        self._warn_if_normalised(query)
        if reference is None:
            if self.reference_x is None:
                raise ValueError("reference is None and no reference was stored with train()/add()")
            rx = self.reference_x.to(qx)
            rs = None if self.reference_s is None else self.reference_s.to(qx)
        else:
            rx = self._ref_sample(reference).to(qx)
            rs = self._ref_structure(reference)
            rs = None if rs is None else rs.to(qx)
        if self.weighting == "symmetric" and self.mode != "plain" and rs is None:
            raise ValueError("weighting='symmetric' needs packed [x || s] references (their structure embeddings)")
        if self.weighting == "query":
            rs = None
        if ref_includes_query and rx.shape[0] < qx.shape[0]:
            raise ValueError("ref_includes_query=True needs the queries to be the first rows of reference")
        available = rx.shape[0] - int(bool(ref_includes_query))
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if k > available:
            raise ValueError(f"k={k} exceeds the number of searchable references ({available})")

        if self.normalize_sample:
            qx, rx = torch.nn.functional.normalize(qx, dim=1), torch.nn.functional.normalize(rx, dim=1)
        # faiss (via PML's FaissKNN) needs contiguous tensors; slices of packed rows are not
        qx, rx = qx.contiguous(), rx.contiguous()
        if self.mode == "plain":
            return self.base_knn(qx, k, rx, ref_includes_query)
        if self.mode == "exhaustive":
            return self._exhaustive(qx, qs, k, rx, rs, ref_includes_query)

        num_c = min(max(k, self.num_candidates), available)
        _, cand = self.base_knn(qx, num_c, rx, ref_includes_query)
        cand = cand.to(qx.device).long()
        with torch.no_grad():
            dw = F_namr.structure_weighted_sq_distance_to_candidates(qx, qs, rx, cand, s_ref=rs, blend=self.blend)
        dw_sorted, order = torch.sort(dw, dim=1, stable=True)
        return dw_sorted[:, :k], torch.gather(cand, 1, order)[:, :k]

    def _exhaustive(self, qx, qs, k, rx, rs, ref_includes_query):
        with torch.no_grad():
            dw = F_namr.rerank_sq_distance(qx, qs, rx, rs, self.blend)
            if ref_includes_query:
                n = qx.shape[0]
                dw[torch.arange(n, device=dw.device), torch.arange(n, device=dw.device)] = float("inf")
        dist, idx = torch.topk(dw, k, dim=1, largest=False, sorted=True)
        return dist, idx
