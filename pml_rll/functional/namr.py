"""Pure tensor functions for NAMR (Neighborhood-Adaptive Multi-cluster Ranking).

Every function is differentiable where that makes sense, has no state and never loops over anchors in
Python. Section references are to ``docs/namr.md``: section 2 the notation, section 3 the model, section 4
the training loss, section 5 retrieval, section 6 the numerical choices.

Numerical choices shared by the pairwise functions:

* Pairwise (squared) distances are computed in the Gram form ``|a|^2 - 2 a.b + |b|^2`` so memory is
  O(N*N) and never O(N*N*d). Before the Gram form the batch mean is subtracted: every distance here is
  translation invariant, and centring removes most of the cancellation error of the Gram form when the
  embeddings share a large common offset.
* The anchor-adaptive distance of section 4.2 clamps every per-dimension squared difference at ``1e-12``.
  That clamp cannot be applied inside a matrix product, so :func:`anchor_adaptive_sq_distance` applies
  it to the sum instead: ``max(sum_k s_ik (x_ik - x_jk)^2, 1e-12 * sum_k s_ik)``. Both forms are bounded
  below by ``1e-12 * sum_k s_ik`` and differ by at most ``1e-12 * sum_k s_ik`` (at most ``d * s_max *
  1e-12``) inside the square root; they agree exactly for identical points and wherever no per-dimension
  difference is below ``1e-6``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: per-dimension clamp of the squared difference in the NASA adaptive distance (section 4.2)
ADAPTIVE_EPS = 1e-12
#: clamp of the squared Euclidean distance before the square root (NASA code, section 6)
PDIST_EPS = 1e-12


def _check_2d_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (batch, width), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def split_packed(packed: torch.Tensor, embedding_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``[x || s]`` (width ``2 * embedding_size``) into the sample and structure parts (section 3.3)."""
    _check_2d_float("packed embeddings", packed)
    if packed.shape[1] != 2 * embedding_size:
        raise ValueError(
            f"packed embeddings must have width 2 * embedding_size = {2 * embedding_size} "
            f"([sample || structure]), got width {packed.shape[1]}. Did the tester or a miner receive "
            "the packed vector, or was embedding_size set wrongly?"
        )
    return packed[:, :embedding_size], packed[:, embedding_size:]


def sample_part(reference: torch.Tensor, embedding_size: int, name: str = "reference") -> torch.Tensor:
    """The sample embedding of a reference set given packed (``2 * embedding_size``) or as x alone."""
    _check_2d_float(name, reference)
    if reference.shape[1] == 2 * embedding_size:
        return reference[:, :embedding_size]
    if reference.shape[1] == embedding_size:
        return reference
    raise ValueError(
        f"{name} must have width 2 * embedding_size = {2 * embedding_size} (packed) or "
        f"embedding_size = {embedding_size} (sample part), got width {reference.shape[1]}"
    )


def pack(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Pack sample and structure embeddings into ``[x || s]`` (section 3.3)."""
    _check_2d_float("x", x)
    _check_2d_float("s", s)
    if x.shape != s.shape:
        raise ValueError(f"x and s must have the same shape, got {tuple(x.shape)} and {tuple(s.shape)}")
    return torch.cat([x, s], dim=1)


def pairwise_sq_euclidean(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances ``|x_i - y_j|^2`` (N x M) in Gram form after centring, clamped at 0."""
    y = x if y is None else y
    centre = y.mean(dim=0, keepdim=True)
    xc, yc = x - centre, y - centre
    sq = (xc * xc).sum(1, keepdim=True) - 2.0 * xc @ yc.t() + (yc * yc).sum(1).unsqueeze(0)
    return sq.clamp(min=0.0)


def pairwise_euclidean(x: torch.Tensor) -> torch.Tensor:
    """Plain Euclidean distance matrix of x with an exact zero diagonal (sections 4.3 and 6).

    Off-diagonal squared distances are clamped at ``PDIST_EPS`` before the square root so the gradient
    stays finite for coincident points."""
    n = x.shape[0]
    sq = pairwise_sq_euclidean(x).clamp(min=PDIST_EPS)
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    return sq.sqrt().masked_fill(eye, 0.0)


def mean_pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """d_bar = mean over i != j of |x_i - x_j| (section 4.1; not detached)."""
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"mean pairwise distance needs a batch of at least 2 embeddings, got {n}")
    return pairwise_euclidean(x).sum() / (n * (n - 1))


def scale_by_mean_distance(x: torch.Tensor) -> torch.Tensor:
    """x_tilde = x / d_bar, with d_bar differentiable (section 4.1)."""
    return x / mean_pairwise_distance(x)


def distance_statistics(x: torch.Tensor, include_diagonal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """mu, sigma of the plain Euclidean distances of x, detached (section 4.3).

    Plain distances, no epsilon (nothing flows back through them). ``include_diagonal=True`` is the
    NASA-exact choice: all N*N entries, diagonal zeros included.
    sigma is Bessel-corrected, as ``torch.std``."""
    with torch.no_grad():
        n = x.shape[0]
        eye = torch.eye(n, dtype=torch.bool, device=x.device)
        dist = pairwise_sq_euclidean(x.detach()).sqrt().masked_fill(eye, 0.0)
        if include_diagonal:
            values = dist.reshape(-1)
        else:
            values = dist[~eye]
        return values.mean(), values.std()


def cluster_centres(mu: torch.Tensor, sigma: torch.Tensor, t_values: Sequence[float], floor: float) -> torch.Tensor:
    """eta_m = max(floor * mu, mu - t_m * sigma), deduplicated and sorted descending (section 4.3).

    Deduplication: after the floor two centres can coincide exactly (both floored, or sigma == 0). A
    duplicated centre would silently count its tier twice in the soft assignment, so only distinct
    values are kept."""
    t = torch.as_tensor(list(t_values), dtype=mu.dtype, device=mu.device)
    eta = torch.maximum(floor * mu, mu - t * sigma)
    unique: torch.Tensor = torch.unique(eta.detach())
    return unique.flip(0)


def per_anchor_statistics(x: torch.Tensor, neighbourhood_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """mu_i, sigma_i (N each) of each anchor's own plain Euclidean distances, detached (``center_mode="per_anchor"``).

    ``neighbourhood_k=None``: over the anchor's whole row (its N - 1 distances to the other batch items);
    an integer k (2 <= k): over its k nearest only (capped at N - 1). sigma is Bessel-corrected. This is a
    reconstruction of the "neighbourhood-adaptive" centres that NAMR's title suggests; NASA's code uses the
    batch statistics of :func:`distance_statistics`."""
    with torch.no_grad():
        n = x.shape[0]
        eye = torch.eye(n, dtype=torch.bool, device=x.device)
        dist = pairwise_sq_euclidean(x.detach()).sqrt()
        if neighbourhood_k is None or neighbourhood_k >= n - 1:
            values = dist[~eye].view(n, n - 1)
        else:
            values = dist.masked_fill(eye, float("inf")).topk(neighbourhood_k, dim=1, largest=False).values
        sigma = values.std(dim=1) if values.shape[1] > 1 else torch.zeros_like(values[:, 0])
        return values.mean(dim=1), sigma


def per_anchor_centres(
    mu: torch.Tensor, sigma: torch.Tensor, t_values: Sequence[float], floor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """eta_im = max(floor * mu_i, mu_i - t_m * sigma_i) per anchor: (centres N x M, duplicate mask N x M).

    Centres are in descending order along each row (``t_values`` ascending). A centre equal to the one before
    it in its row (both floored, or sigma_i == 0) is flagged in the mask; the soft assignment gives it weight 0,
    the per-anchor counterpart of the deduplication in :func:`cluster_centres`."""
    t = torch.as_tensor(sorted(float(v) for v in t_values), dtype=mu.dtype, device=mu.device)
    eta = torch.maximum(floor * mu[:, None], mu[:, None] - t * sigma[:, None]).detach()
    duplicate = torch.zeros_like(eta, dtype=torch.bool)
    duplicate[:, 1:] = eta[:, 1:] == eta[:, :-1]
    return eta, duplicate


def anchor_adaptive_sq_distance(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """D_ij^2 = sum_k s_ik max((x_ik - x_jk)^2, 1e-12), with the clamp applied to the sum (sections 4.2 and 6).

    Uses the anchor's s_i (row), so the matrix is asymmetric. Memory O(N*N): three matrix products with
    (s*x), s and x*x instead of the N x N x d difference tensor. See the module docstring for how the
    1e-12 clamp is handled (difference at most ``1e-12 * sum_k s_ik`` inside the square root)."""
    xc = x - x.mean(dim=0, keepdim=True)
    sx = s * xc
    sq = (sx * xc).sum(1, keepdim=True) - 2.0 * sx @ xc.t() + s @ (xc * xc).t()
    lower = ADAPTIVE_EPS * s.sum(1, keepdim=True)
    return torch.maximum(sq, lower)


def anchor_adaptive_distance(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """D_ij = sqrt(sum_k s_ik (x_ik - x_jk)^2) (sections 2 and 4.2)."""
    return anchor_adaptive_sq_distance(x, s).sqrt()


def centre_gaps(dist: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """|D_ij - eta_m|: batch centres (M,) or per-anchor centres (N x M, one row per anchor i)."""
    if centres.ndim == 2:
        return (dist.unsqueeze(-1) - centres.unsqueeze(1)).abs()
    return (dist.unsqueeze(-1) - centres).abs()


def soft_assignment(
    dist: torch.Tensor, centres: torch.Tensor, alpha: float, duplicate: torch.Tensor | None = None
) -> torch.Tensor:
    """c_ijm = softmax_m(-alpha * |D_ij - eta_m|), shape dist.shape + (M,) (section 4.4; not detached).

    ``centres`` is (M,) (batch centres) or (N x M) (per-anchor centres, row i for anchor i); ``duplicate``
    (N x M, per-anchor only) marks centres that get weight 0."""
    logits = -alpha * centre_gaps(dist, centres)
    if duplicate is not None:
        logits = logits.masked_fill(duplicate.unsqueeze(1), float("-inf"))
    return torch.softmax(logits, dim=-1)


def multi_cluster_pair_loss(
    dist: torch.Tensor, centres: torch.Tensor, alpha: float, duplicate: torch.Tensor | None = None
) -> torch.Tensor:
    """l_ij = sum_m c_ijm |D_ij - eta_m| (section 4.4; with M = 2 the NASA c*a + (1-c)*b)."""
    return (soft_assignment(dist, centres, alpha, duplicate) * centre_gaps(dist, centres)).sum(-1)


def multi_cluster_anchor_losses(
    x: torch.Tensor,
    s: torch.Tensor,
    t_values: Sequence[float] = (0.0, 3.0),
    alpha: float = 10.0,
    floor: float = 0.2,
    include_diagonal: bool = True,
    center_mode: str = "batch",
    neighbourhood_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-anchor multi-cluster ranking loss: mean over j != i of l_ij (section 4.4).

    The mean of the returned vector over anchors equals the NASA loss (mean over all N(N-1) ordered
    pairs), because every anchor has N - 1 pairs. ``center_mode="batch"``: one set of centres from the batch
    statistics (NASA); ``"per_anchor"``: each anchor's centres from its own row of distances, or its
    ``neighbourhood_k`` nearest (:func:`per_anchor_statistics`; ``include_diagonal`` is then unused).
    Returns (anchor_losses, adaptive distances, centres (M,) or (N x M))."""
    n = x.shape[0]
    pair, dist, centres = multi_cluster_pair_matrix(
        x, s, t_values, alpha, floor, include_diagonal, center_mode, neighbourhood_k
    )
    off_diag = ~torch.eye(n, dtype=torch.bool, device=x.device)
    anchor_losses = (pair * off_diag).sum(1) / (n - 1)
    return anchor_losses, dist, centres


def multi_cluster_pair_matrix(
    x: torch.Tensor,
    s: torch.Tensor,
    t_values: Sequence[float] = (0.0, 3.0),
    alpha: float = 10.0,
    floor: float = 0.2,
    include_diagonal: bool = True,
    center_mode: str = "batch",
    neighbourhood_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """l_ij for every ordered pair (N x N, diagonal not zeroed), the adaptive distances and the centres.

    The parts of :func:`multi_cluster_anchor_losses` before the mean over each anchor's row; see there."""
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"the multi-cluster ranking loss needs a batch of at least 2 embeddings, got {n}")
    duplicate = None
    if center_mode == "per_anchor":
        mu, sigma = per_anchor_statistics(x, neighbourhood_k)
        centres, duplicate = per_anchor_centres(mu, sigma, t_values, floor)
    elif center_mode == "batch":
        mu, sigma = distance_statistics(x, include_diagonal=include_diagonal)
        centres = cluster_centres(mu, sigma, t_values, floor)
    else:
        raise ValueError(f"center_mode must be 'batch' or 'per_anchor', got {center_mode!r}")
    dist = anchor_adaptive_distance(x, s)
    return multi_cluster_pair_loss(dist, centres, alpha, duplicate), dist, centres


def effective_weights(s: torch.Tensor, blend: float) -> torch.Tensor:
    """w = (1 - blend) + blend * s: the blend of plain (w = 1) and structure-weighted (w = s) squared distances.

    ``sum_k w_k (x_qk - x_jk)^2 = (1 - blend) |x_q - x_j|^2 + blend * sum_k s_k (x_qk - x_jk)^2``."""
    return s if blend == 1.0 else (1.0 - blend) + blend * s


def structure_weighted_sq_distance(query: torch.Tensor, s_query: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """d_w(q, j) = sum_k s_qk (x_qk - x_jk)^2 for all query/reference pairs, Q x R (section 5.1).

    Gram form after centring on the reference mean, clamped at 0. Query-weighted only: references
    contribute just their sample embeddings."""
    centre = ref.mean(dim=0, keepdim=True)
    qc, rc = query - centre, ref - centre
    sq_ = s_query * qc
    sq = (sq_ * qc).sum(1, keepdim=True) - 2.0 * sq_ @ rc.t() + s_query @ (rc * rc).t()
    return sq.clamp(min=0.0)


def rerank_sq_distance(
    query: torch.Tensor,
    s_query: torch.Tensor,
    ref: torch.Tensor,
    s_ref: torch.Tensor | None = None,
    blend: float = 1.0,
) -> torch.Tensor:
    """Re-ranking distance for all query/reference pairs, Q x R.

    ``s_ref=None``: ``sum_k w_qk (x_qk - x_jk)^2`` (query-weighted, NASA when ``blend == 1``); with ``s_ref``:
    the symmetric ``sum_k (w_qk + w_jk) / 2 (x_qk - x_jk)^2``; ``w = effective_weights(s, blend)``."""
    d = structure_weighted_sq_distance(query, effective_weights(s_query, blend), ref)
    if s_ref is None:
        return d
    d_ref = structure_weighted_sq_distance(ref, effective_weights(s_ref, blend), query).t()
    return 0.5 * (d + d_ref)


def structure_weighted_sq_distance_to_candidates(
    query: torch.Tensor,
    s_query: torch.Tensor,
    ref: torch.Tensor,
    candidates: torch.Tensor,
    chunk_elements: int = 1 << 24,
    *,
    s_ref: torch.Tensor | None = None,
    blend: float = 1.0,
) -> torch.Tensor:
    """d_w(q, c) for each query's own candidate list (Q x K indices into ref), exact differences (section 5.1).

    Weights as in :func:`rerank_sq_distance`: the query's s (NASA), or the mean of the query's and the
    candidate's s when ``s_ref`` (R x d) is given, each blended with 1 by ``blend``.
    Processed in query chunks so the gathered (chunk x K x d) tensor stays below ``chunk_elements``."""
    q, k = candidates.shape
    d = query.shape[1]
    out = torch.empty(q, k, dtype=query.dtype, device=query.device)
    step = max(1, chunk_elements // max(1, k * d))
    for start in range(0, q, step):
        stop = min(q, start + step)
        diff = query[start:stop].unsqueeze(1) - ref[candidates[start:stop]]
        w = s_query[start:stop].unsqueeze(1)
        if s_ref is not None:
            w = 0.5 * (w + s_ref[candidates[start:stop]])
        out[start:stop] = (effective_weights(w, blend) * diff * diff).sum(-1)
    return out


def centre_structure(s: torch.Tensor, reference_s: torch.Tensor | None = None) -> torch.Tensor:
    """s divided by its mean over samples, per dimension: ``s_ik / mean_j s_jk`` (the "centred" structure embedding).

    The mean is taken over ``reference_s`` when given (e.g. a gallery's structure embeddings at retrieval time),
    else over ``s`` itself (the batch, during training; not detached, so a loss on the result is invariant to
    multiplying every sample's s_k by the same constant and the gradient has no component along that global
    per-dimension re-weighting). The result is positive wherever s is."""
    base = s if reference_s is None else reference_s
    return s / base.mean(dim=0, keepdim=True)


def shortlist_ranking_losses(
    x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor, k: int = 8, temperature: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-anchor pairwise ranking loss on the structure-weighted distances of each anchor's short list.

    For anchor i, the short list C_i is its ``k`` nearest other batch items by plain squared Euclidean distance on
    x (capped at N - 1); ``d_w(i, j) = sum_k s_ik (x_ik - x_jk)^2`` and ``m_i`` the mean plain squared distance to
    C_i. For every same-class p and other-class n in C_i:

        loss_ipn = softplus((d_w(i, p) - d_w(i, n)) / (temperature * m_i))

    and anchor i's loss is the mean over its (p, n) pairs. x is detached: the term trains s only, for the job s does
    at retrieval time (re-ranking the plain short list). Returns (losses (N,), has_pairs (N,) bool); an anchor whose
    short list holds no positive or no negative has loss 0 and ``has_pairs`` False."""
    n = x.shape[0]
    xd = x.detach()
    with torch.no_grad():
        plain = pairwise_sq_euclidean(xd)
        eye = torch.eye(n, dtype=torch.bool, device=x.device)
        kc = min(k, n - 1)
        cand = plain.masked_fill(eye, float("inf")).topk(kc, dim=1, largest=False).indices  # N x kc
        scale = torch.gather(plain, 1, cand).mean(1).clamp_min(torch.finfo(xd.dtype).tiny)  # m_i
        same = labels[cand] == labels[:, None]  # N x kc
        pair_mask = same.unsqueeze(2) & ~same.unsqueeze(1)  # [i, p, n]
    diff = xd.unsqueeze(1) - xd[cand]  # N x kc x d
    dw = (s.unsqueeze(1) * diff * diff).sum(-1)  # N x kc
    margin = (dw.unsqueeze(2) - dw.unsqueeze(1)) / (temperature * scale)[:, None, None]
    per_pair = torch.nn.functional.softplus(margin) * pair_mask
    count = pair_mask.sum((1, 2))
    losses = per_pair.sum((1, 2)) / count.clamp_min(1)
    return losses, count > 0
