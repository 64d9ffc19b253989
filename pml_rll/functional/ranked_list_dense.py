"""The Ranked List Loss on Euclidean distances, dense and free of host synchronisation.

"Ranked List Loss for Deep Metric Learning", CVPR 2019 (eqs. 2-5). Every (query, gallery item) pair is computed, in
tiles of queries x gallery items, with fixed-shape tensor operations only: no ``nonzero``, no ``.item()``, no
host-side decision on a data-dependent size. This is what a GPU (where each synchronisation stalls the stream) and
``torch.compile`` (where each one breaks the graph) need, and what wins on a CPU when the lists are long.

Per query the two sets are reduced tile by tile into running sums, as in an online softmax: the shift of the
weights (the set's maximum of ``T * hinge``, or a constant where it is known to be safe), the normaliser
``S = sum exp(T * hinge - shift)``, the weighted hinge sum ``H`` and, for the paper's rule, the query's gradient
``G = sum_j exp(.) / d_ij * (q_i - g_j)``. With the paper's rule the gradient is complete at the end of the forward
pass (the weights are constants and the gallery is fixed), so the backward pass only scales it: one matmul forward
for the distances and one for the gradient, and nothing of size queries x gallery kept. With the autograd rule the
backward pass recomputes the tiles (the weights' derivative needs the per-query losses, known only at the end).
Memory is O(tile) whatever the gallery size: a cross-batch memory of 65,536 items costs a few tiles.

Near-duplicate pairs (squared Gram distance below ``NEAR_SQUARED_DISTANCE``) are recomputed from explicit
differences, as on the list path, for the ``NEAR_PER_QUERY`` nearest gallery items of each query (a fixed-size
``topk``); beyond that many per query (collapsed embeddings) the Gram values stand.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .ranked_list import NEAR_SQUARED_DISTANCE, ZERO_DISTANCE_EPS, MaskFn, squared_norms
from .ranked_list_params import RankedListParams

# Near-duplicates recomputed exactly per query (the query itself, when the gallery is the batch, comes on top).
NEAR_PER_QUERY = 4
# Elements per tile: cache-sized on a CPU, one large tile on a GPU (a 4096 x 4096 batch in one go).
_TILE_ELEMENTS_CPU = 1 << 19
_TILE_ELEMENTS_CUDA = 1 << 25
# At least this many queries per tile (a wider gallery is then cut into chunks): an efficient matmul.
_MIN_TILE_ROWS = 128
# A constant shift T * max(hinge) is used when it cannot underflow a weight: T * span below this fraction of
# -log(smallest normal number) of the dtype. Otherwise the running maximum of each set is the shift.
_SAFE_EXPONENT_FRACTION = 0.5


def sync_free_wanted(x: Tensor) -> bool:
    """Where the dense path is always taken: on CUDA, and while ``torch.compile`` traces."""
    return x.is_cuda or torch.compiler.is_compiling()


class _Tile(NamedTuple):
    """One tile's distances and their near-duplicate correction."""

    d: Tensor  # (b, c) distances, near-duplicates exact
    tiny: Tensor  # (b, c) distance within rounding of 0: gradient direction 0
    near_idx: Tensor  # (b, k) columns of the k nearest gallery items of each query
    near: Tensor  # (b, k) which of them were recomputed exactly
    near_diff: Tensor  # (b, k, D) q_i - g_j for those k items


def _tile_distances(q: Tensor, g: Tensor, q_sq: Tensor, g_sq: Tensor, near_k: int) -> _Tile:
    """Distances of a tile through the Gram form, the near-duplicates recomputed from explicit differences."""
    sq = torch.addmm(g_sq[None, :], q, g.T, alpha=-2).add_(q_sq[:, None])
    k = min(near_k, sq.shape[1])
    vals, idx = torch.topk(sq, k, dim=1, largest=False, sorted=False)
    diff = q[:, None, :] - g[idx]
    near = vals < NEAR_SQUARED_DISTANCE
    sq.scatter_(1, idx, torch.where(near, diff.pow(2).sum(-1), vals))
    d = sq.clamp_min_(0).sqrt_()
    tiny = d <= ZERO_DISTANCE_EPS * torch.finfo(d.dtype).eps
    return _Tile(d, tiny, idx, near, diff)


def _members(
    tile: _Tile, masks: MaskFn, rows: slice, cols: slice, params: RankedListParams, diag: int | None
) -> tuple[Tensor, Tensor]:
    """Non-trivial positives (d > alpha - m, the query itself excluded) and negatives (d < alpha) of a tile."""
    pos, neg = masks(rows, cols)
    neg = ~pos if neg is None else neg
    member_p = pos & (tile.d > params.positive_boundary)
    member_n = neg & (tile.d < params.negative_boundary)
    if diag is not None:  # the gallery is the batch: entry (r, r + diag) is the query itself
        member_p.diagonal(diag).fill_(False)
    return member_p, member_n


def _fixed_shift(T: float, span: float | None, dtype: torch.dtype) -> float | None:
    """A constant shift of ``T * hinge`` that cannot underflow, or None when the running maximum is needed.

    ``span``: an upper bound of the hinge (None: unbounded). T = 0 needs no shift (a plain mean).
    """
    if T == 0:
        return 0.0
    if T < 0 or span is None:
        return None
    limit = -math.log(torch.finfo(dtype).tiny) * _SAFE_EXPONENT_FRACTION
    return T * span if T * span <= limit else None


class _SetState:
    """Running per-query sums of one set (P* or N*): shift, normaliser S, weighted hinge H, gradient G."""

    def __init__(self, b: int, dim: int, like: Tensor, shift: float | None, with_grad: bool) -> None:
        self.fixed = shift
        self.shift = like.new_full((b,), shift if shift is not None else float("-inf"))
        self.S = like.new_zeros(b)
        self.H = like.new_zeros(b)
        self.G = like.new_zeros(b, dim) if with_grad else None

    def weights(self, T: float, hinge: Tensor, member: Tensor) -> Tensor:
        """exp(T * hinge - shift) on the members, 0 elsewhere; moves the running shift and rescales the sums."""
        if T == 0:
            return member.to(hinge.dtype)
        logits = (hinge * T).masked_fill_(~member, float("-inf"))
        if self.fixed is None:
            new = torch.maximum(self.shift, logits.amax(1))
            new = new.masked_fill(new == float("-inf"), 0.0)  # no member yet: any finite shift
            scale = torch.exp(self.shift - new)
            self.S.mul_(scale)
            self.H.mul_(scale)
            if self.G is not None:
                self.G.mul_(scale[:, None])
            self.shift = new
        return logits.sub_(self.shift[:, None]).exp_()

    def add(self, e: Tensor, hinge: Tensor) -> None:
        self.S.add_(e.sum(1))
        self.H.add_((e * hinge).sum(1))

    def loss(self) -> Tensor:
        """The weighted mean hinge of the set (eqs. 3, 4); 0 for an empty set."""
        return self.H / self.S.masked_fill(self.S == 0, 1.0)


def _pair_gradient(c: Tensor, tile: _Tile, q: Tensor, g: Tensor) -> Tensor:
    """sum_j c_ij (q_i - g_j) for a tile: the Gram form, the near-duplicates from their explicit differences.

    ``c`` is changed in place (its near-duplicate entries are zeroed).
    """
    c_near = c.gather(1, tile.near_idx).masked_fill_(~tile.near, 0.0)
    c.scatter_(1, tile.near_idx, c.gather(1, tile.near_idx).masked_fill_(tile.near, 0.0))
    out = c.sum(1)[:, None] * q - c @ g
    return out.add_((c_near[:, :, None] * tile.near_diff).sum(1))


def _tiling(B: int, R: int, x: Tensor) -> tuple[int, int]:
    """(queries, gallery items) per tile."""
    elements = _TILE_ELEMENTS_CUDA if x.is_cuda else _TILE_ELEMENTS_CPU
    rows = min(B, max(_MIN_TILE_ROWS, elements // max(R, 1)))
    return rows, min(R, max(1, elements // rows))


def _forward_block(
    q: Tensor,
    g: Tensor,
    q_sq: Tensor,
    g_sq: Tensor,
    masks: MaskFn,
    rows: slice,
    params: RankedListParams,
    same: bool,
    chunk: int,
    paper_grad: bool,
) -> tuple[Tensor, _SetState, _SetState, Tensor, Tensor]:
    """One block of queries against the whole gallery, chunk by chunk: (losses, P*, N* states, counts)."""
    b, R, dim = q.shape[0], g.shape[0], q.shape[1]
    near_k = NEAR_PER_QUERY + (1 if same else 0)
    alpha, lam = params.negative_boundary, params.imbalance
    p = _SetState(b, dim, q, _fixed_shift(params.Tp, None, q.dtype), paper_grad)
    n = _SetState(b, dim, q, _fixed_shift(params.Tn, alpha, q.dtype), paper_grad)
    count_p = torch.zeros((), dtype=torch.long, device=q.device)
    count_n = torch.zeros((), dtype=torch.long, device=q.device)
    single = chunk >= R
    for start in range(0, R, chunk):
        cols = slice(start, min(R, start + chunk))
        g_c = g[cols]
        tile = _tile_distances(q, g_c, q_sq, g_sq[cols], near_k)
        diag = rows.start - start if same and -b < rows.start - start < cols.stop - start else None
        member_p, member_n = _members(tile, masks, rows, cols, params, diag)
        count_p = count_p + member_p.sum()
        count_n = count_n + member_n.sum()
        h_p = tile.d - params.positive_boundary
        h_n = alpha - tile.d
        e_p = p.weights(params.Tp, h_p, member_p)
        e_n = n.weights(params.Tn, h_n, member_n)
        p.add(e_p, h_p)
        n.add(e_n, h_n)
        if not paper_grad:
            continue
        inv_d = torch.reciprocal(tile.d).masked_fill_(tile.tiny, 0.0)
        if single:  # the normalisers are final: one product for both sets
            coef_p = (1 - lam) / p.S.masked_fill(p.S == 0, 1.0)
            coef_n = lam / n.S.masked_fill(n.S == 0, 1.0)
            c = (e_p * coef_p[:, None]).sub_(e_n * coef_n[:, None]).mul_(inv_d)
            assert p.G is not None
            p.G.add_(_pair_gradient(c, tile, q, g_c))
        else:
            for state, e in ((p, e_p), (n, e_n)):
                assert state.G is not None
                state.G.add_(_pair_gradient(e.mul_(inv_d), tile, q, g_c))
    losses = (1 - lam) * p.loss() + lam * n.loss()
    return losses, p, n, count_p, count_n


def _paper_gradient(p: _SetState, n: _SetState, lam: float, single: bool) -> Tensor:
    """d loss_i / d q_i under the paper's rule, from the running sums of a block."""
    assert p.G is not None and n.G is not None
    if single:  # combined during the pass
        return p.G
    return (
        p.G * ((1 - lam) / p.S.masked_fill(p.S == 0, 1.0))[:, None]
        - n.G * (lam / n.S.masked_fill(n.S == 0, 1.0))[:, None]
    )


class _RankedListDense(torch.autograd.Function):
    """Forward: per-query losses, tile by tile. Backward: the paper's gradient (computed in the forward pass) or
    the autograd rule's (tiles recomputed)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        query: Tensor,
        ref: Tensor | None,
        masks: MaskFn,
        params: RankedListParams,
        paper: bool,
        need_grad: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        same = ref is None
        gallery = query if ref is None else ref
        B, R = query.shape[0], gallery.shape[0]
        step, chunk = _tiling(B, R, query)
        q_sq_all, g_sq = squared_norms(query), squared_norms(gallery)
        losses, grads, stats = [], [], []
        count_p = torch.zeros((), dtype=torch.long, device=query.device)
        count_n = torch.zeros((), dtype=torch.long, device=query.device)
        for start in range(0, B, step):
            rows = slice(start, min(B, start + step))
            out, p, n, c_p, c_n = _forward_block(
                query[rows], gallery, q_sq_all[rows], g_sq, masks, rows, params, same, chunk, need_grad and paper
            )
            losses.append(out)
            count_p, count_n = count_p + c_p, count_n + c_n
            if need_grad and paper:
                grads.append(_paper_gradient(p, n, params.imbalance, chunk >= R))
            elif need_grad:
                stats.append(torch.stack([p.shift, p.S, p.loss(), n.shift, n.S, n.loss()]))
        ctx.paper, ctx.same, ctx.params, ctx.masks, ctx.tiling = paper, same, params, masks, (step, chunk)
        if need_grad and paper:
            ctx.save_for_backward(torch.cat(grads))
        elif need_grad:
            ctx.save_for_backward(query, gallery, torch.cat(stats, 1))
        ctx.mark_non_differentiable(count_p, count_n)
        return torch.cat(losses), count_p, count_n

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_losses: Tensor, _gp: Tensor | None, _gn: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        if ctx.paper:
            (grad,) = ctx.saved_tensors
            return grad * grad_losses[:, None], None, None, None, None, None
        query, gallery, stats = ctx.saved_tensors
        grad_q, grad_g = _autograd_backward(
            query, gallery, stats, grad_losses, ctx.masks, ctx.params, ctx.same, ctx.tiling, ctx.needs_input_grad[1]
        )
        return grad_q, grad_g, None, None, None, None


def _autograd_backward(
    query: Tensor,
    gallery: Tensor,
    stats: Tensor,
    grad_losses: Tensor,
    masks: MaskFn,
    params: RankedListParams,
    same: bool,
    tiling: tuple[int, int],
    ref_needs_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """The exact derivative of the losses: tiles recomputed, weights differentiated, both ends of every pair moved.

    d loss_i / d hinge_ij = w_ij (1 + T (hinge_ij - L_set,i)) per set, times (1 - lambda) or lambda.
    """
    B, R = query.shape[0], gallery.shape[0]
    step, chunk = tiling
    alpha, lam = params.negative_boundary, params.imbalance
    near_k = NEAR_PER_QUERY + (1 if same else 0)
    q_sq_all, g_sq = squared_norms(query), squared_norms(gallery)
    to_gallery = same or ref_needs_grad
    grad_q = torch.zeros_like(query)
    grad_g = torch.zeros_like(gallery) if to_gallery else None
    shift_p, S_p, L_p, shift_n, S_n, L_n = stats
    for start in range(0, B, step):
        rows = slice(start, min(B, start + step))
        q, q_sq, gl = query[rows], q_sq_all[rows], grad_losses[rows]
        b = q.shape[0]
        a_p = gl * (1 - lam) / S_p[rows].masked_fill(S_p[rows] == 0, 1.0)
        a_n = gl * lam / S_n[rows].masked_fill(S_n[rows] == 0, 1.0)
        for c_start in range(0, R, chunk):
            cols = slice(c_start, min(R, c_start + chunk))
            g_c = gallery[cols]
            tile = _tile_distances(q, g_c, q_sq, g_sq[cols], near_k)
            diag = start - c_start if same and -b < start - c_start < cols.stop - c_start else None
            member_p, member_n = _members(tile, masks, rows, cols, params, diag)
            h_p = tile.d - params.positive_boundary
            h_n = alpha - tile.d
            k = torch.zeros_like(tile.d)
            for T, h, member, shift, L, a, sign in (
                (params.Tp, h_p, member_p, shift_p[rows], L_p[rows], a_p, 1.0),
                (params.Tn, h_n, member_n, shift_n[rows], L_n[rows], a_n, -1.0),
            ):
                if T == 0:
                    e = member.to(h.dtype)
                else:
                    e = (h * T).sub_(shift[:, None]).exp_().masked_fill_(~member, 0.0)
                    e.mul_((h - L[:, None]).mul_(T).add_(1.0))
                k.add_(e.mul_((sign * a)[:, None]))
            c = k.mul_(torch.reciprocal(tile.d).masked_fill_(tile.tiny, 0.0))
            c_near = c.gather(1, tile.near_idx).masked_fill_(~tile.near, 0.0)
            grad_q[rows] += _pair_gradient(c, tile, q, g_c)  # zeroes c's near-duplicate entries
            if grad_g is not None:
                target = grad_q if same else grad_g
                target[cols] += c.sum(0)[:, None] * g_c - c.T @ q
                pair = (c_near[:, :, None] * tile.near_diff).reshape(-1, q.shape[1])
                target[cols] -= torch.zeros_like(g_c).index_add_(0, tile.near_idx.reshape(-1), pair)
    return grad_q, None if same else grad_g


def ranked_list_dense(
    query: Tensor, ref: Tensor | None, masks: MaskFn, *, params: RankedListParams, paper: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-query Ranked List Loss on Euclidean distances, dense and synchronisation-free.

    Same contract as :func:`.ranked_list_euclidean.ranked_list_euclidean`: ``ref=None`` means the gallery is the
    query batch; returns (losses (B,), number of non-trivial positives, of negatives), the counts as 0-d tensors.
    """
    need_grad = torch.is_grad_enabled() and (query.requires_grad or (ref is not None and ref.requires_grad))
    out: tuple[Tensor, Tensor, Tensor] = _RankedListDense.apply(query, ref, masks, params, paper, need_grad)
    return out
