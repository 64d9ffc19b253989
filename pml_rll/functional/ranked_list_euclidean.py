"""The Ranked List Loss on Euclidean distances with a hand-written backward pass.

One matmul forward (the Gram matrix, block by block of queries) and one matmul backward: the backward needs only
the B x R matrix of coefficients ``dL/dd_ij / d_ij``, so the distance matrix, the masks and the weights are never
kept for autograd. This is what makes the loss cheaper than its own Gram-matrix floor (which autograd
differentiates with two matmuls) and lean in memory.
"""

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .ranked_list import distance_gradients, refine_small_distances, squared_euclidean

# A function (start, stop) -> (pos_mask, neg_mask) for the queries start:stop, each (stop - start) x R bool.
MaskFn = Callable[[int, int], Tuple[Tensor, Tensor]]

# Squared distances below this are recomputed from explicit differences (see refine_small_distances).
_REFINE_BELOW = 1e-4
# Distances at most this many machine epsilons are treated as 0: their direction is undefined (spec case 5).
_ZERO_DISTANCE = 64
# Elements per block of queries: large enough for an efficient matmul, small enough to stay in cache.
_BLOCK_ELEMENTS = 1 << 18


def label_masks(labels: Tensor, ref_labels: Tensor, exclude_self: bool) -> MaskFn:
    """Candidate pairs from class labels: same label = positive, different = negative, self excluded."""

    def masks(start: int, stop: int) -> Tuple[Tensor, Tensor]:
        same = labels[start:stop, None] == ref_labels[None, :]
        pos = same.clone() if exclude_self else same
        if exclude_self:
            rows = torch.arange(stop - start, device=labels.device)
            pos[rows, rows + start] = False
        return pos, ~same

    return masks


def dense_masks(pos_mask: Tensor, neg_mask: Tensor) -> MaskFn:
    """Candidate pairs given as dense boolean matrices (e.g. built from a miner's indices)."""
    return lambda start, stop: (pos_mask[start:stop], neg_mask[start:stop])


def euclidean_distances(query: Tensor, gallery: Tensor, budget: int) -> Tuple[Tensor, Optional[Tuple[Tensor, Tensor]]]:
    """Euclidean distances through the Gram matrix, the near-duplicates recomputed exactly (when few)."""
    sq = squared_euclidean(query, gallery)
    near = refine_small_distances(sq, query, gallery, _REFINE_BELOW, budget)
    return sq.sqrt_(), near


class _RankedListEuclidean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, ref, masks, params, paper, same):  # type: ignore[override]
        margin, alpha, Tp, Tn, imbalance = params
        gallery = query if same else ref
        B, R = query.shape[0], gallery.shape[0]
        losses = query.new_empty(B)
        coeff = query.new_empty(B, R)
        num_pos = query.new_zeros(())
        num_neg = query.new_zeros(())
        near_rows, near_cols, near_coeff = [], [], []
        step = max(1, min(B, _BLOCK_ELEMENTS // max(R, 1)))
        for start in range(0, B, step):
            stop = min(B, start + step)
            q = query[start:stop]
            d, near = euclidean_distances(q, gallery, budget=4 * B)
            pos_mask, neg_mask = masks(start, stop)
            r, grad_d = distance_gradients(
                d, pos_mask, neg_mask, margin, alpha, Tp, Tn, imbalance, detach_weights=paper
            )
            losses[start:stop] = r.losses
            num_pos += r.pos_set.sum()
            num_neg += r.neg_set.sum()
            # d d_ij / d q_i = (q_i - r_j) / d_ij: keep grad_d / d, with a zero direction where d is 0 up to rounding
            tiny = d <= _ZERO_DISTANCE * torch.finfo(d.dtype).eps
            k = grad_d.div_(d.masked_fill(tiny, 1.0)).masked_fill_(tiny, 0.0)
            if near is not None:
                rows, cols = near
                near_rows.append(rows + start)
                near_cols.append(cols)
                near_coeff.append(k[rows, cols].clone())
                k[rows, cols] = 0  # handled exactly in backward, without Gram-form cancellation
            coeff[start:stop] = k
        if near_rows:
            near_t = (torch.cat(near_rows), torch.cat(near_cols), torch.cat(near_coeff))
        else:
            empty = torch.zeros(0, dtype=torch.long, device=query.device)
            near_t = (empty, empty, query.new_zeros(0))
        ctx.paper, ctx.same = paper, same
        ctx.save_for_backward(query, gallery, coeff, *near_t)
        ctx.mark_non_differentiable(num_pos, num_neg)
        return losses, num_pos, num_neg

    @staticmethod
    def backward(ctx, grad_losses, _gp, _gn):  # type: ignore[override]
        query, gallery, coeff, rows, cols, near_coeff = ctx.saved_tensors
        c = coeff * grad_losses[:, None]
        grad_q = grad_r = None
        to_gallery = not ctx.paper and (ctx.same or ctx.needs_input_grad[1])
        if ctx.same and to_gallery:
            c = c + c.T  # each pair appears in both lists: one matmul for both ends
            grad_q = c.sum(1, keepdim=True) * query - c @ query
        else:
            grad_q = c.sum(1, keepdim=True) * query - c @ gallery
            if to_gallery:
                grad_r = c.sum(0)[:, None] * gallery - c.T @ query
        if rows.numel() > 0:
            pair = (near_coeff * grad_losses[rows])[:, None] * (query[rows] - gallery[cols])
            grad_q = grad_q.index_add(0, rows, pair)
            if to_gallery:
                if ctx.same:
                    grad_q = grad_q.index_add(0, cols, -pair)
                else:
                    grad_r = grad_r.index_add(0, cols, -pair)
        return grad_q, grad_r, None, None, None, None


def ranked_list_euclidean(
    query: Tensor,
    ref: Optional[Tensor],
    masks: MaskFn,
    margin: float,
    alpha: float,
    Tp: float,
    Tn: float,
    imbalance: float,
    paper: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-query Ranked List Loss on Euclidean distances between ``query`` and ``ref`` rows.

    ``ref=None`` means the gallery is the query batch itself. ``paper=True``: weights constant and each pair's
    gradient reaches only its query (the gallery is fixed); ``paper=False``: the exact gradient of the value.
    Returns (losses (B,), total non-trivial positives, total non-trivial negatives).
    """
    params = (float(margin), float(alpha), float(Tp), float(Tn), float(imbalance))
    return _RankedListEuclidean.apply(query, ref, masks, params, paper, ref is None)
