"""NAMRReRankKNN: index search on the sample embedding, re-ranked by the query's structure embedding."""

from __future__ import annotations

import warnings

import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.utils.inference import CustomKNN

from ..functional import namr as F_namr
from ..utils.validation import (
    check_bool,
    check_callable,
    check_choice,
    check_int,
    check_number,
    check_packed,
    check_reference,
)

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
    in two stages (docs/namr.md, section 5.1): (1) the K_c nearest references by plain Euclidean distance on the
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

    Bad input (see :mod:`pml_rll.utils.validation`): queries must be packed (N, 2d), floating point, finite, with
    a strictly positive structure part; references (given to the call, or to :meth:`train` / :meth:`add`, which
    then store nothing) must be finite: a NaN or infinite gallery row raises a ``ValueError`` naming the argument
    and the row, where the gallery is given, instead of making every distance NaN. ``k`` is an int (numpy ints
    too) in [1, number of searchable references]. For finite input the result never holds -1 indices or NaN
    distances: in "rerank" and "exhaustive" modes x (and each query's s) is first divided by a power of two when
    its magnitude would make squared distances overflow or underflow (exact, so the ranking and distances are
    unchanged; a distance beyond the dtype's range comes back as inf); in "plain" mode, indices outside the
    gallery from ``base_knn`` (faiss answers -1 when squared distances overflow float32) raise a ``ValueError``.

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
        centre_structure: divide every structure embedding by the mean s per dimension before re-ranking, the
            retrieval side of ``MultiClusterRankingLoss(centre_structure=True)``. The mean is over the references'
            s when they are packed (given to the call or stored), else over the call's queries; with a single
            query and sample-only references the centred s is all ones and re-ranking equals plain retrieval.
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
        centre_structure: bool = False,
    ):
        embedding_size = check_int("embedding_size", embedding_size)
        num_candidates = check_int("num_candidates", num_candidates)
        check_choice("mode", mode, self.MODES)
        check_callable("base_knn", base_knn, optional=True)
        normalize_sample = check_bool("normalize_sample", normalize_sample)
        check_choice("weighting", weighting, self.WEIGHTINGS)
        self.centre_structure = check_bool("centre_structure", centre_structure)
        self.weighting = weighting
        self.blend = check_number("blend", blend, 0.0, 1.0)
        self.embedding_size = embedding_size
        self.num_candidates = num_candidates
        self.base_knn = default_base_knn() if base_knn is None else base_knn
        self.mode = mode
        self.normalize_sample = bool(normalize_sample)
        self.reference_x: torch.Tensor | None = None
        self.reference_s: torch.Tensor | None = None

    @classmethod
    def for_loss(cls, loss, mode: str | None = None, base_knn=None, **overrides) -> NAMRReRankKNN:
        """The kNN to evaluate a ``NAMRLoss``'s embeddings with: its retrieval settings (the ones validated for its
        base loss by default; ``overrides`` laid over them) in the geometry the loss trained
        (``loss.retrieval_settings``). ``mode`` (default: the settings' mode, else ``"rerank"``): ``"plain"`` gives
        the Euclidean order on x in the same geometry."""
        settings = getattr(loss, "retrieval_settings", None)
        if not callable(settings):
            raise TypeError(f"loss: expected a NAMRLoss (with retrieval_settings), got {type(loss).__name__}")
        kw = settings(**overrides)
        if mode is not None:
            kw["mode"] = mode
        return cls(loss.embedding_size, base_knn=base_knn, **kw)

    # -- InferenceModel support -------------------------------------------------------------------
    def train(self, embeddings: torch.Tensor) -> None:
        """``InferenceModel`` support: replace the stored reference set by ``embeddings`` (packed or sample-only)."""
        check_reference("embeddings", embeddings, self.embedding_size)  # before reset: a rejected call keeps the index
        self.reset()
        self._append(embeddings)

    def add(self, embeddings: torch.Tensor) -> None:
        """``InferenceModel`` support: append ``embeddings`` (packed or sample-only, as stored) to the reference set."""
        check_reference("embeddings", embeddings, self.embedding_size)
        self._append(embeddings)

    def _append(self, embeddings: torch.Tensor) -> None:
        new = self._ref_sample(embeddings).detach()
        new_s = self._ref_structure(embeddings)
        if self.reference_x is not None and (new_s is None) != (self.reference_s is None):
            raise ValueError("add(): mix of packed and sample-only reference embeddings")
        if self.reference_x is None:
            self.reference_x, self.reference_s = new, new_s
        else:
            self.reference_x = torch.cat([self.reference_x, new.to(self.reference_x)])
            if new_s is not None and self.reference_s is not None:
                self.reference_s = torch.cat([self.reference_s, new_s.to(self.reference_s)])

    def reset(self) -> None:
        """Forget the stored reference set."""
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
        check_packed("query", query, self.embedding_size)
        k = check_int("k", k)
        ref_includes_query = check_bool("ref_includes_query", ref_includes_query)
        if reference is not None:
            check_reference("reference", reference, self.embedding_size)
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
        if self.centre_structure:
            mean_s = (qs if rs is None else rs).mean(dim=0, keepdim=True)
            qs = qs / mean_s
            rs = None if rs is None else rs / mean_s
        if self.weighting == "query":
            rs = None
        if ref_includes_query and rx.shape[0] < qx.shape[0]:
            raise ValueError("ref_includes_query=True needs the queries to be the first rows of reference")
        available = rx.shape[0] - int(ref_includes_query)
        if k > available:
            raise ValueError(f"k={k} exceeds the number of searchable references ({available})")

        if self.normalize_sample:
            qx, rx = torch.nn.functional.normalize(qx, dim=1), torch.nn.functional.normalize(rx, dim=1)
        # faiss (via PML's FaissKNN) needs contiguous tensors; slices of packed rows are not
        qx, rx = qx.contiguous(), rx.contiguous()
        if self.mode == "plain":
            dist, idx = self.base_knn(qx, k, rx, ref_includes_query)
            return dist, self._checked_indices(idx, rx.shape[0], "plain")
        # exact power-of-two rescaling so that squared distances neither overflow nor underflow (see the class);
        # s is rescaled only where the distance is homogeneous in it (query weighting, no blend)
        qx, rx, qs, unscale = _rescaled(qx, rx, qs, rescale_s=rs is None and self.blend == 0.0)
        if self.mode == "exhaustive":
            dist, idx = self._exhaustive(qx, qs, k, rx, rs, ref_includes_query)
            return dist * unscale, idx

        num_c = min(max(k, self.num_candidates), available)
        _, cand = self.base_knn(qx, num_c, rx, ref_includes_query)
        cand = self._checked_indices(cand.to(qx.device).long(), rx.shape[0], "rerank")
        with torch.no_grad():
            dw = F_namr.structure_weighted_sq_distance_to_candidates(qx, qs, rx, cand, s_ref=rs, blend=self.blend)
        dw_sorted, order = torch.sort(dw, dim=1, stable=True)
        return dw_sorted[:, :k] * unscale, torch.gather(cand, 1, order)[:, :k]

    @staticmethod
    def _checked_indices(idx: torch.Tensor, num_refs: int, mode: str) -> torch.Tensor:
        # a faiss index answers -1 where it found no finite distance; never let that pick the last reference
        if idx.numel() and bool(((idx < 0) | (idx >= num_refs)).any()):
            raise ValueError(
                f"base_knn returned indices outside [0, {num_refs}) in mode {mode!r} (a faiss index answers -1 when "
                "squared distances overflow float32); rescale the embeddings or use mode='exhaustive'"
            )
        return idx

    def _exhaustive(self, qx, qs, k, rx, rs, ref_includes_query):
        with torch.no_grad():
            dw = F_namr.rerank_sq_distance(qx, qs, rx, rs, self.blend)
            if ref_includes_query:
                n = qx.shape[0]
                dw[torch.arange(n, device=dw.device), torch.arange(n, device=dw.device)] = float("inf")
        dist, idx = torch.topk(dw, k, dim=1, largest=False, sorted=True)
        return dist, idx


def _pow2(t: torch.Tensor) -> torch.Tensor:
    """The power of two 2^e with max|t| in [2^(e-1), 2^e) (1 for an all-zero t); dividing by it is exact."""
    _, e = torch.frexp(t)
    return torch.ldexp(torch.ones_like(t), e)


def _rescaled(
    qx: torch.Tensor, rx: torch.Tensor, qs: torch.Tensor, rescale_s: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qx, rx, qs, unscale): x divided by one power of two and each query's s by its own, when their magnitudes
    would make squared distances overflow or underflow; ``d_w * unscale`` is then the distance of the inputs.

    d_w is homogeneous (degree 2 in x, 1 in each query's s) and power-of-two scaling is exact, so the ranking and
    the distances are those of the inputs, except that a distance beyond the dtype's range is returned as inf or 0
    rather than poisoning the Gram form with inf - inf = NaN."""
    one = torch.ones((), dtype=qx.dtype, device=qx.device)
    m = torch.maximum(qx.abs().amax(), rx.abs().amax()) if qx.numel() and rx.numel() else one
    sm = qs.amax(dim=1, keepdim=True) if qs.numel() and rescale_s else one
    lo, hi = 2.0**-16, 2.0**16
    if bool((m >= lo) & (m <= hi)) and bool(((sm >= lo) & (sm <= hi)).all()):
        return qx, rx, qs, one
    cx = _pow2(m)
    if not rescale_s:
        return qx / cx, rx / cx, qs, cx * cx
    cs = _pow2(sm)
    return qx / cx, rx / cx, qs / cs, cx * cx * cs
