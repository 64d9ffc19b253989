"""The Ranked List Loss on Euclidean distances, with a hand-written backward pass.

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
from .ranked_list import (
    NEAR_SQUARED_DISTANCE,
    LabelMasks,
    MaskFn,
    hinge_gradients,
    negative_hinge,
    pair_product,
    positive_hinge,
    ranked_lists,
    squared_euclidean,
    squared_norms,
    unit_coefficients,
)
from .ranked_list_dense import ranked_list_dense, sync_free_wanted
from .ranked_list_params import RankedListParams
from .ranked_list_split import ranked_list_split, split_supported

# Elements per block of queries: large enough for an efficient matmul, small enough to stay in cache (CPU);
# on a GPU, where every block costs a synchronisation, a whole 4096 x 4096 batch is one block.
_BLOCK_ELEMENTS = 1 << 20
_BLOCK_ELEMENTS_CUDA = 1 << 24
# CPU: the dense path is taken when more than this fraction of the candidate negatives of a sample of queries is
# non-trivial (the lists would be long, and listing them costs more than the dense passes).
_DENSE_FRACTION = 1 / 20
# CPU: the dense path is also taken for a gallery of at least this many items (a cross-batch memory): its memory
# stays O(tile) where the lists of a long gallery grow with it.
_LARGE_GALLERY = 16384
# CPU: the split path is taken from this many pairs on (about a 2048 x 2048 batch), where its symmetric panels and
# lean passes beat both the list and the dense paths whatever the lists' lengths (below, its fixed costs do not pay).
_SPLIT_PAIRS = 1 << 22
# CPU, long lists (see _DENSE_FRACTION): the split path from this many pairs on (about 724 x 724; below, the dense
# path or the list path wins). Without the split path, the autograd rule lists the pairs below _LIST_AUTOGRAD_PAIRS
# (the dense path's second pass over every pair costs more than long lists there) and takes the dense path above.
_SPLIT_PAIRS_LONG = 1 << 19
_LIST_AUTOGRAD_PAIRS = 1 << 20
PATHS = ("auto", "list", "dense", "split")


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


class _RankedListEuclidean(torch.autograd.Function):
    """The list path: forward lists the non-trivial pairs; backward applies their closed-form gradients."""

    @staticmethod
    def forward(
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


def ranked_list_list_path(
    query: Tensor, ref: Tensor | None, masks: MaskFn, *, params: RankedListParams, paper: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The list path of :func:`ranked_list_euclidean`: only the non-trivial pairs are listed (host-side sizes)."""
    out: tuple[Tensor, Tensor, Tensor] = _RankedListEuclidean.apply(query, ref, masks, params, paper, ref is None)
    return out


def dense_lists_expected(query: Tensor, ref: Tensor | None, masks: MaskFn, *, params: RankedListParams) -> bool:
    """CPU: whether the lists are long enough for the dense path to win, judged on a sample of queries.

    The Gram block of up to 64 queries (a few percent of one matmul) is computed and the fraction of non-trivial
    negatives among their candidate negatives compared with a fixed threshold; a host-side decision, taken only
    where synchronising costs nothing.
    """
    gallery = query if ref is None else ref
    rows = slice(0, min(64, query.shape[0]))
    d = squared_euclidean(query[rows], gallery).clamp_min_(0).sqrt_()
    pos, neg = masks(rows, slice(None))
    neg = ~pos if neg is None else neg
    hard = int((neg & (d < params.negative_boundary)).sum())
    return hard > _DENSE_FRACTION * max(int(neg.sum()), 1)


def _auto_path(
    query: Tensor, ref: Tensor | None, masks: MaskFn, *, params: RankedListParams, paper: bool, split: bool = True
) -> str:
    """CPU: the path ``"auto"`` takes; ``split``: whether the split path applies (:func:`.split_supported`).

    The split path for a large batch or reference set, and for long lists from a medium batch on; below that, long
    lists take the dense path with the paper's rule and the list path with the autograd rule (whose dense second
    pass costs more than the lists); short lists take the list path. Measured on 2 CPU threads
    (``python -m benchmarks.loss_speed --inputs hard`` and ``--inputs random``).
    """
    B, R = query.shape[0], query.shape[0] if ref is None else ref.shape[0]
    large = R >= _LARGE_GALLERY
    if split and (large or B * R >= _SPLIT_PAIRS):
        return "split"
    if large:
        return "dense"
    if not dense_lists_expected(query, ref, masks, params=params):
        return "list"
    if split and B * R >= _SPLIT_PAIRS_LONG:
        return "split"
    return "dense" if paper or B * R >= _LIST_AUTOGRAD_PAIRS else "list"


def ranked_list_euclidean(
    query: Tensor,
    ref: Tensor | None,
    masks: MaskFn,
    *,
    params: RankedListParams,
    paper: bool,
    path: str = "auto",
    count_negatives: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-query Ranked List Loss on Euclidean distances between ``query`` and ``ref`` rows.

    ``ref=None`` means the gallery is the query batch itself. ``paper=True``: weights constant and each pair's
    gradient reaches only its query (the gallery is fixed); ``paper=False``: the exact gradient of the value.
    Returns (losses (B,), number of non-trivial positives, number of non-trivial negatives); the last is None with
    ``count_negatives=False`` (the split path then skips counting them, a few percent of its time).

    ``path``: ``"list"`` lists the non-trivial pairs (fastest on a CPU when they are few; the list sizes are
    decided on the host), ``"dense"`` computes every pair in tiles without any synchronisation
    (:mod:`.ranked_list_dense`), ``"split"`` lists the positives from the labels and computes the negatives in
    lean blocks (:mod:`.ranked_list_split`; a CPU form for long lists and large reference sets, with labels and
    both gradient rules; where it does not apply the dense path is taken). ``"auto"`` takes the dense path on
    CUDA and under ``torch.compile``; on a CPU the split path for a large batch (``_SPLIT_PAIRS`` pairs), a large
    reference set or long lists (a sample of queries shows them) from a medium batch on, where it applies;
    otherwise the dense path for a large reference set or long lists (the list path for long lists of a small
    batch with the autograd rule), the list path for short lists. All give the same values and gradients.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if path == "auto" and sync_free_wanted(query):
        path = "dense"
    elif path in ("auto", "split"):
        supported = isinstance(masks, LabelMasks) and split_supported(query, masks, params=params)
        asked = path
        if asked == "auto":
            path = _auto_path(query, ref, masks, params=params, paper=paper, split=supported)
        if path == "split" and supported:
            assert isinstance(masks, LabelMasks)
            out = ranked_list_split(query, ref, masks, params=params, paper=paper, count_negatives=count_negatives)
            if out is not None:
                return out
        if path == "split" and asked == "split":  # it does not apply (or the positives are not sparse)
            path = "dense"
        elif path == "split":  # the positives are not sparse (rare): auto chooses again without it
            path = _auto_path(query, ref, masks, params=params, paper=paper, split=False)
    if path == "dense":
        losses, n_pos, n_neg = ranked_list_dense(query, ref, masks, params=params, paper=paper)
    else:
        losses, n_pos, n_neg = ranked_list_list_path(query, ref, masks, params=params, paper=paper)
    return losses, n_pos, n_neg if count_negatives else None


def euclidean_distances(query: Tensor, gallery: Tensor) -> Tensor:
    """Dense Euclidean distances, computed as the loss computes them (Gram form, near-duplicates exact)."""
    sq = squared_euclidean(query, gallery)
    rows, cols = torch.nonzero(sq < NEAR_SQUARED_DISTANCE, as_tuple=True)
    d, _ = exact_distances(sq[rows, cols], rows, cols, query, gallery, budget=4 * len(query))
    out = sq.clamp_min_(0).sqrt_()
    out[rows, cols] = d
    return out
