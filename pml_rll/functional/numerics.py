"""Numeric building blocks shared by the Euclidean paths of the Ranked List Loss (list, dense and split).

Gram-form squared distances and the exact recomputation of near-duplicate pairs, products with a matrix given by
its pairs, the per-pair coefficients of a gradient along the difference vectors, and the constant shift that
keeps the weights' exponentials in range. The formulas of the loss itself live in :mod:`.ranked_list`.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from torch import Tensor

# Pairs with a squared distance below this are recomputed from explicit differences: the Gram form loses small
# distances to rounding (identical float32 embeddings come out about 3e-4 apart instead of 0).
NEAR_SQUARED_DISTANCE = 1e-4
# Distances at most this many machine epsilons are 0: their direction is undefined, use 0
# (docs/ranked_list_loss.md, pairs at distance 0).
ZERO_DISTANCE_EPS = 64
# A product with a matrix given by its pairs is sparse when at most this fraction of all entries is listed.
SPARSE_DENSITY = 1 / 32

# A constant shift T * max(hinge) is used when it cannot underflow a weight: T * span below this fraction of
# -log(smallest normal number) of the dtype. Otherwise the running maximum of each set is the shift.
SAFE_EXPONENT_FRACTION = 0.5


def safe_exponent_limit(dtype: torch.dtype) -> float:
    """The largest exponent span a constant shift may cover in ``dtype`` (``SAFE_EXPONENT_FRACTION`` of
    ``-log`` of its smallest normal number): 43.7 in float32, 354 in float64."""
    return -math.log(torch.finfo(dtype).tiny) * SAFE_EXPONENT_FRACTION


def fixed_shift(T: float, span: float | None, dtype: torch.dtype) -> float | None:
    """A constant shift of ``T * hinge`` that cannot underflow, or None when the running maximum is needed.

    ``span``: an upper bound of the hinge (None: unbounded). T = 0 needs no shift (a plain mean).
    """
    if T == 0:
        return 0.0
    if T < 0 or span is None:
        return None
    return T * span if T * span <= safe_exponent_limit(dtype) else None


# torch's notices about sparse layouts (the beta state of compressed rows; with some versions, unchecked indices):
# they address torch's own users of those layouts, not ours. torch gives each once per process.
_SPARSE_NOTICES = ("Sparse CSR tensor support is in beta", "Sparse invariant checks")
_SPARSE_BUILT: set[str] = set()


def _sparse_quietly(layout: str, build: Callable[[], Tensor]) -> Tensor:
    """``build()``, the first time per process and ``layout`` with torch's sparse notices silenced. Later calls
    leave the warning filters alone: each change of them makes Python show again every warning it has already
    shown once."""
    if layout in _SPARSE_BUILT:
        return build()
    with warnings.catch_warnings():
        for message in _SPARSE_NOTICES:
            warnings.filterwarnings("ignore", message=message)
        matrix = build()
    _SPARSE_BUILT.add(layout)
    return matrix


def pair_product(rows: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int], dense: Tensor) -> Tensor:
    """(sparse matrix given by rows, cols, values) @ dense; duplicates add up."""
    if values.numel() <= SPARSE_DENSITY * shape[0] * shape[1]:
        matrix = _sparse_quietly(
            "coo", lambda: torch.sparse_coo_tensor(torch.stack([rows, cols]), values, shape, check_invariants=False)
        )
        product: Tensor = torch.sparse.mm(matrix, dense)
        return product
    matrix = values.new_zeros(shape).index_put_((rows, cols), values, accumulate=True)
    out: Tensor = matrix @ dense
    return out


def unit_coefficients(k: Tensor, d: Tensor) -> Tensor:
    """k / d per pair (a derivative along d turned into one along the difference vector), 0 where d is within
    rounding of 0: the direction is undefined there (docs/ranked_list_loss.md, pairs at distance 0)."""
    tiny = d <= ZERO_DISTANCE_EPS * torch.finfo(d.dtype).eps
    return torch.where(tiny, 0.0, k / d.masked_fill(tiny, 1.0))


def add_pair_product(
    out: Tensor, rows: Tensor, cols: Tensor, values: Tensor, dense: Tensor, alpha: float = 1.0
) -> None:
    """``out += alpha * M @ dense`` in place, ``M`` (``out.shape[0]`` x ``dense.shape[0]``) given by its pairs
    (``rows`` ascending): a compressed-row sparse product, no temporary of the pairs' size nor of ``out``'s."""
    crow = torch.zeros(out.shape[0] + 1, dtype=torch.long, device=rows.device)
    torch.cumsum(torch.bincount(rows, minlength=out.shape[0]), 0, out=crow[1:])
    shape = (out.shape[0], dense.shape[0])
    matrix = _sparse_quietly("csr", lambda: torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False))
    out.addmm_(matrix, dense, alpha=alpha)


def squared_norms(x: Tensor) -> Tensor:
    """``||x_i||^2`` of every row of ``x`` (N, D), as a (N,) reduction without a temporary of the size of ``x``."""
    norms: Tensor = torch.linalg.vector_norm(x, dim=1)
    return norms.square_()


def squared_euclidean(
    query: Tensor, ref: Tensor, query_sq: Tensor | None = None, ref_sq: Tensor | None = None
) -> Tensor:
    """Squared Euclidean distances (Q, R) through the Gram matrix, ``||q||^2 + ||r||^2 - 2 q.r``: one matmul.

    ``query_sq`` and ``ref_sq`` are the rows' squared norms when already known (:func:`squared_norms`).
    """
    query_sq = squared_norms(query) if query_sq is None else query_sq
    ref_sq = squared_norms(ref) if ref_sq is None else ref_sq
    return torch.addmm(ref_sq[None, :], query, ref.T, alpha=-2).add_(query_sq[:, None])


def exact_distances(
    sq: Tensor, rows: Tensor, cols: Tensor, query: Tensor, gallery: Tensor, budget: int
) -> tuple[Tensor, Tensor]:
    """Distances of listed pairs, the near-duplicates recomputed from explicit differences. Returns (d, near).

    Near-duplicates are rare; when there are more than ``budget`` (collapsed embeddings) the Gram values stand.
    """
    near = sq < NEAR_SQUARED_DISTANCE
    idx = torch.nonzero(near, as_tuple=True)[0]
    if len(idx) > budget:
        near = torch.zeros_like(near)
    elif len(idx):
        sq = sq.clone()
        sq[idx] = (query[rows[idx]] - gallery[cols[idx]]).pow(2).sum(1)
    return sq.clamp_min(0).sqrt(), near


def euclidean_distances(query: Tensor, gallery: Tensor) -> Tensor:
    """Dense Euclidean distances, computed as the loss computes them (Gram form, near-duplicates exact)."""
    sq = squared_euclidean(query, gallery)
    rows, cols = torch.nonzero(sq < NEAR_SQUARED_DISTANCE, as_tuple=True)
    d, _ = exact_distances(sq[rows, cols], rows, cols, query, gallery, budget=4 * len(query))
    out = sq.clamp_min_(0).sqrt_()
    out[rows, cols] = d
    return out
