"""The Ranked List Loss on Euclidean distances, list path: only the non-trivial pairs, with a hand-written backward
pass.

Forward: one matmul (the Gram matrix, block by block of queries), two comparisons that list the non-trivial pairs,
then the loss on those lists only. Backward: the gradient of every listed pair in closed form, applied with one
sparse (few non-trivial pairs) or dense (many) product. Distances, masks and weights are never kept for autograd.
This is what makes the loss cheaper than its own Gram-matrix floor, which autograd differentiates with two dense
matmuls, and lean in memory.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..utils.autograd import closed_form_backward
from .numerics import NEAR_SQUARED_DISTANCE, exact_distances, pair_product, squared_norms, unit_coefficients
from .ranked_list import MaskFn, hinge_gradients, negative_hinge, positive_hinge, ranked_lists
from .ranked_list_params import RankedListParams

# Elements per block of queries: large enough for an efficient matmul, small enough to stay in cache (CPU);
# on a GPU, where every block costs a synchronisation, a whole 4096 x 4096 batch is one block.
_BLOCK_ELEMENTS = 1 << 20
_BLOCK_ELEMENTS_CUDA = 1 << 24


def candidate_pairs(
    query: Tensor, gallery: Tensor, masks: MaskFn, *, params: RankedListParams, exclude_self: bool
) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
    """Positives with d > alpha - m and negatives with d < alpha, by blocks of queries.

    Returns (rows, cols, squared distance) of each. The comparisons run on ||r_j||^2 - 2 q_i . r_j against
    per-query thresholds, so one matmul, a few comparisons and two listing passes cover a block.
    """
    B, R = query.shape[0], gallery.shape[0]
    alpha, low = params.negative_boundary, params.positive_boundary
    query_sq, gallery_sq = squared_norms(query), squared_norms(gallery)
    # d > low <=> sq > low^2 and d < alpha <=> sq < alpha^2. A boundary within Gram rounding of 0 lists every
    # candidate instead, and the exact distances decide (exact_distances, then the strict check in forward).
    all_pos = not (low >= 0 and low * low >= NEAR_SQUARED_DISTANCE)
    all_neg = alpha * alpha < NEAR_SQUARED_DISTANCE
    pos_limit, neg_limit = low * low - query_sq, alpha * alpha - query_sq
    lists: dict[str, tuple[list[Tensor], list[Tensor], list[Tensor]]] = {"pos": ([], [], []), "neg": ([], [], [])}
    block = _BLOCK_ELEMENTS_CUDA if query.is_cuda else _BLOCK_ELEMENTS
    step = max(1, min(B, block // max(R, 1)))
    for start in range(0, B, step):
        stop = min(B, start + step)
        part = torch.addmm(gallery_sq[None, :], query[start:stop], gallery.T, alpha=-2)
        pos, maybe_neg = masks(slice(start, stop), slice(None))
        neg = ~pos if maybe_neg is None else maybe_neg
        pos_act = pos.clone() if all_pos else pos & (part > pos_limit[start:stop, None])
        neg_act = neg if all_neg else neg & (part < neg_limit[start:stop, None])
        if exclude_self:  # a query is never its own positive
            diag = torch.arange(stop - start, device=query.device)
            pos_act[diag, diag + start] = False
        for kind, act in (("pos", pos_act), ("neg", neg_act)):
            rows, cols = torch.nonzero(act, as_tuple=True)
            out = lists[kind]
            out[0].append(rows + start)
            out[1].append(cols)
            out[2].append(part[rows, cols])

    def joined(kind: str) -> tuple[Tensor, Tensor, Tensor]:
        rows, cols, sq = (torch.cat(t) for t in lists[kind])
        return rows, cols, sq.add_(query_sq[rows])

    return joined("pos"), joined("neg")


class _RankedListList(torch.autograd.Function):
    """The list path: forward lists the non-trivial pairs; backward applies their closed-form gradients."""

    @staticmethod
    def forward(  # noqa: PLR0917 (Function.apply passes its arguments by position)
        ctx: Any, query: Tensor, ref: Tensor | None, masks: MaskFn, params: RankedListParams, paper: bool, same: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        alpha, margin = params.negative_boundary, params.margin
        gallery = query if same or ref is None else ref
        B = query.shape[0]
        (pr, pc, psq), (nr, nc, nsq) = candidate_pairs(query, gallery, masks, params=params, exclude_self=same)
        P = len(pr)
        rows, cols = torch.cat([pr, nr]), torch.cat([pc, nc])
        d, near = exact_distances(torch.cat([psq, nsq]), rows, cols, query, gallery, budget=4 * B)
        h_p, h_n = positive_hinge(d[:P], alpha, margin), negative_hinge(d[P:], alpha)
        in_p, in_n = h_p > 0, h_n > 0  # the exact strict boundaries (listed pairs outside get weight 0)
        r = ranked_lists(h_p, pr, h_n, nr, B, params=params, detach_weights=True, pos_member=in_p, neg_member=in_n)
        g_p, g_n = hinge_gradients(r, h_p, pr, h_n, nr, params=params, detach_weights=paper)
        # d d_ij / d q_i = (q_i - r_j) / d_ij; d hinge_pos / d d = +1, d hinge_neg / d d = -1
        k = unit_coefficients(torch.cat([g_p, -g_n]), d)
        ctx.paper, ctx.same = paper, same
        ctx.save_for_backward(query, gallery, rows, cols, k, near)
        num_pos, num_neg = in_p.sum(), in_n.sum()
        ctx.mark_non_differentiable(num_pos, num_neg)
        return r.losses, num_pos, num_neg

    @staticmethod
    @closed_form_backward("the Ranked List Loss (list path)")
    def backward(ctx: Any, grad_losses: Tensor, _gp: Tensor | None, _gn: Tensor | None) -> tuple[Tensor | None, ...]:
        query, gallery, rows, cols, k, near = ctx.saved_tensors
        B, R = query.shape[0], gallery.shape[0]
        c = k * grad_losses[rows]
        to_gallery = not ctx.paper and (ctx.same or ctx.needs_input_grad[1])
        # near-duplicates: exact differences instead of the Gram form, which cancels catastrophically there
        exact: tuple[Tensor, Tensor, Tensor] | None = None
        if bool(near.any()):
            idx = torch.nonzero(near, as_tuple=True)[0]
            exact = (rows[idx], cols[idx], c[idx][:, None] * (query[rows[idx]] - gallery[cols[idx]]))
            c = c.masked_fill(near, 0.0)
        grad_r: Tensor | None = None
        if ctx.same and to_gallery:  # each pair sits in two lists: one product for both ends
            rows, cols, c = torch.cat([rows, cols]), torch.cat([cols, rows]), torch.cat([c, c])
        weight = torch.zeros(B, dtype=c.dtype, device=c.device).index_add_(0, rows, c)
        grad_q = weight[:, None] * query - pair_product(rows, cols, c, (B, R), gallery)
        if to_gallery and not ctx.same:
            weight = torch.zeros(R, dtype=c.dtype, device=c.device).index_add_(0, cols, c)
            grad_r = weight[:, None] * gallery - pair_product(cols, rows, c, (R, B), query)
        if exact is not None:
            e_rows, e_cols, pair = exact
            grad_q.index_add_(0, e_rows, pair)
            if to_gallery:
                target = grad_q if ctx.same or grad_r is None else grad_r
                target.index_add_(0, e_cols, -pair)
        return grad_q, grad_r, None, None, None, None


def ranked_list_list(
    query: Tensor, ref: Tensor | None, masks: MaskFn, *, params: RankedListParams, paper: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The list path of :func:`.ranked_list_euclidean.ranked_list_euclidean`: only the non-trivial pairs are listed
    (host-side sizes). Same contract as the other paths (the number of non-trivial negatives always counted)."""
    out: tuple[Tensor, Tensor, Tensor] = _RankedListList.apply(query, ref, masks, params, paper, ref is None)
    return out
