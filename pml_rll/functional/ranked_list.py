"""Functional core of the Ranked List Loss.

"Ranked List Loss for Deep Metric Learning", CVPR 2019 (equations 2-5) and its TPAMI 2021
extension. Every function here is a pure tensor function; the loss, the reducer and the miner of this package all
call them, so the math exists exactly once.

Ranked lists are held as lists of pairs: a pair is a (query, gallery item) with a hinge value, and ``query`` gives
the row (query index) of every pair. Only the non-trivial pairs are ever listed, which is what the loss is made of,
so nothing is spent on the (usually many) trivial ones.

* A set that is empty contributes 0 (the paper leaves 1/|P*| undefined there).
* Weights are normalised inside each set with the set's maximum subtracted first, so no temperature overflows,
  and there is no epsilon in any denominator.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from .ranked_list_params import RankedListParams


class MaskFn(Protocol):
    """(rows, cols) -> (pos_mask, neg_mask): the candidate pairs of the queries ``rows`` against the gallery items
    ``cols`` (two slices). Bool matrices, or 1/0 matrices of ``dtype`` when one is given; neg_mask None means
    "every pair that is not a positive"."""

    def __call__(
        self, rows: slice, cols: slice, *, dtype: torch.dtype | None = None, out: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """The masks of one tile; ``out``, when given with ``dtype``, may receive the positive mask."""
        ...


class LabelMasks:
    """Candidate pairs from class labels: same label = positive, different = negative (a :class:`MaskFn`).

    1/0 masks compare the labels as float32 when they are small integers (exact below 2^24; a CPU-only shortcut,
    decided once on the host), otherwise convert the bool comparison. The labels stay readable (``labels``,
    ``ref_labels``), so that a path may list the positive pairs instead of comparing every pair.
    """

    def __init__(self, labels: Tensor, ref_labels: Tensor) -> None:
        self.labels, self.ref_labels = labels, ref_labels
        self._decided = False
        self._as_float: tuple[Tensor, Tensor] | None = None

    def __call__(
        self, rows: slice, cols: slice, *, dtype: torch.dtype | None = None, out: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        labels, ref_labels = self.labels, self.ref_labels
        if dtype is None:
            return labels[rows, None] == ref_labels[None, cols], None
        if not self._decided:
            both = (labels, ref_labels)
            small = all(not t.is_floating_point() and (t.numel() == 0 or bool(t.abs().max() < 2**24)) for t in both)
            self._as_float = (labels.float(), ref_labels.float()) if small else None
            self._decided = True
        pair = self._as_float
        if pair is None:
            return (labels[rows, None] == ref_labels[None, cols]).to(dtype), None
        a, b = pair[0][rows], pair[1][cols]
        out = a.new_empty((a.shape[0], b.shape[0]), dtype=dtype) if out is None else out
        return torch.eq(a[:, None], b[None, :], out=out), None


def label_masks(labels: Tensor, ref_labels: Tensor) -> LabelMasks:
    """Candidate pairs from class labels (see :class:`LabelMasks`)."""
    return LabelMasks(labels, ref_labels)


def same_label_pairs(
    labels: Tensor, ref_labels: Tensor, max_pairs: int | None = None
) -> tuple[Tensor, Tensor, Tensor] | None:
    """Every (i, j) with ``labels[i] == ref_labels[j]``, rows ascending, found by sorting (no B x R comparison).

    The labels are compared in their promoted dtype, as ``==`` compares them. Returns (rows, cols, row_starts):
    the pairs of query i are ``rows[row_starts[i]:row_starts[i + 1]]`` (``row_starts`` has B + 1 entries); None,
    before listing them, when there are more than ``max_pairs``. Reads the number of pairs on the host.
    """
    common = torch.promote_types(labels.dtype, ref_labels.dtype)
    values, order = torch.sort(ref_labels.to(common), stable=True)
    labels = labels.to(common)
    low = torch.searchsorted(values, labels, right=False)
    counts = torch.searchsorted(values, labels, right=True) - low
    row_starts = torch.zeros(len(labels) + 1, dtype=torch.long, device=labels.device)
    torch.cumsum(counts, 0, out=row_starts[1:])
    total = int(row_starts[-1])
    if max_pairs is not None and total > max_pairs:
        return None
    rows = torch.repeat_interleave(torch.arange(len(labels), device=labels.device), counts, output_size=total)
    within = torch.arange(total, device=labels.device) - row_starts[rows]
    return rows, order[low[rows] + within], row_starts


def dense_masks(pos_mask: Tensor, neg_mask: Tensor) -> MaskFn:
    """Candidate pairs given as dense boolean matrices (e.g. built from a miner's indices)."""

    def masks(
        rows: slice, cols: slice, *, dtype: torch.dtype | None = None, out: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        pos, neg = pos_mask[rows, cols], neg_mask[rows, cols]
        return (pos, neg) if dtype is None else (pos.to(dtype), neg.to(dtype))

    return masks


def positive_hinge(d: Tensor, alpha: float, margin: float) -> Tensor:
    """Eq. 2 for a positive pair: ``d - (alpha - margin)``, positive when the pair violates its constraint."""
    return d - (alpha - margin)


def negative_hinge(d: Tensor, alpha: float) -> Tensor:
    """Eq. 2 for a negative pair: ``alpha - d``, positive when the pair lies closer than ``alpha``."""
    return alpha - d


def is_non_trivial(hinge: Tensor) -> Tensor:
    """Membership of the non-trivial sets P* (``d > alpha - m``) and N* (``d < alpha``): a strictly positive hinge."""
    return hinge > 0


def set_weights(
    hinge: Tensor, query: Tensor, num_queries: int, temperature: float, member: Tensor | None = None
) -> Tensor:
    """Eq. 4 weights of listed pairs: ``exp(T * hinge)`` normalised over each query's set, max-shifted per set.

    Args:
        hinge: (P,) hinge of every listed pair.
        query: (P,) int64 query index of every pair.
        num_queries: the number of queries (the length of the per-query sums).
        temperature: T (Tp or Tn); 0 gives a plain mean over the set.
        member: optional (P,) bool; listed pairs that are not members of the set get weight 0.

    Returns:
        (P,) weights summing to 1 over each non-empty set (no epsilon: an empty set has no weights).
    """
    logits = temperature * hinge
    if member is not None:
        logits = logits.masked_fill(~member, float("-inf"))
    shift = torch.full((num_queries,), float("-inf"), dtype=hinge.dtype, device=hinge.device)
    shift = shift.scatter_reduce(0, query, logits.detach(), "amax", include_self=True)
    shift = shift.masked_fill(shift == float("-inf"), 0.0)
    w = torch.exp(logits - shift[query])
    total = torch.zeros(num_queries, dtype=hinge.dtype, device=hinge.device).index_add(0, query, w)
    return w / total.masked_fill(total == 0, 1.0)[query]


def weighted_set_loss(weights: Tensor, hinge: Tensor, query: Tensor, num_queries: int) -> Tensor:
    """Eqs. 3 and 4: per query, the sum of ``weight * hinge`` over its set (a plain mean for L_P at Tp = 0)."""
    out = torch.zeros(num_queries, dtype=hinge.dtype, device=hinge.device)
    return out.index_add(0, query, weights * hinge)


def query_loss(loss_p: Tensor, loss_n: Tensor, imbalance: float) -> Tensor:
    """Eq. 5 in PML's convention, ``(1 - imbalance) * L_P + imbalance * L_N`` (the CVPR form is ``L_P + l * L_N``)."""
    return (1 - imbalance) * loss_p + imbalance * loss_n


class RankedLists(NamedTuple):
    """Per-query losses and the normalised weight of every listed pair."""

    losses: Tensor  # (N,) eq. 5
    loss_p: Tensor  # (N,) L_P, eq. 3
    loss_n: Tensor  # (N,) L_N, eq. 4
    w_p: Tensor  # weight of each positive pair
    w_n: Tensor  # weight of each negative pair


def ranked_lists(
    pos_hinge: Tensor,
    pos_query: Tensor,
    neg_hinge: Tensor,
    neg_query: Tensor,
    num_queries: int,
    *,
    params: RankedListParams,
    detach_weights: bool,
    pos_member: Tensor | None = None,
    neg_member: Tensor | None = None,
) -> RankedLists:
    """Eqs. 3-5 from the hinges of the non-trivial pairs (P* and N*) and the query of each pair.

    Differentiable with respect to the hinges. With ``detach_weights`` the weights are constants (the paper's
    rule); otherwise autograd also differentiates them. ``pos_member`` / ``neg_member``, when given, mark which
    listed pairs are in the set (the others get weight 0), so that a list need not be filtered.
    """
    p_in = pos_hinge.detach() if detach_weights else pos_hinge
    n_in = neg_hinge.detach() if detach_weights else neg_hinge
    w_p = set_weights(p_in, pos_query, num_queries, params.Tp, pos_member)
    w_n = set_weights(n_in, neg_query, num_queries, params.Tn, neg_member)
    loss_p = weighted_set_loss(w_p, pos_hinge, pos_query, num_queries)
    loss_n = weighted_set_loss(w_n, neg_hinge, neg_query, num_queries)
    return RankedLists(query_loss(loss_p, loss_n, params.imbalance), loss_p, loss_n, w_p, w_n)


def hinge_gradients(
    r: RankedLists,
    pos_hinge: Tensor,
    pos_query: Tensor,
    neg_hinge: Tensor,
    neg_query: Tensor,
    *,
    params: RankedListParams,
    detach_weights: bool,
) -> tuple[Tensor, Tensor]:
    """d loss_i / d hinge_ij of every listed pair, in closed form (docs/ranked_list_loss.md, the two gradient rules).

    Constant weights (the paper): the normalised weight. Differentiable weights (plain autograd):
    w_ij * (1 + T * (hinge_ij - L_set,i)).
    """
    g_p, g_n = r.w_p, r.w_n
    if not detach_weights:
        g_p = g_p * (1 + params.Tp * (pos_hinge - r.loss_p[pos_query]))
        g_n = g_n * (1 + params.Tn * (neg_hinge - r.loss_n[neg_query]))
    return (1 - params.imbalance) * g_p, params.imbalance * g_n


def non_trivial_pairs(
    d: Tensor, pos_mask: Tensor, neg_mask: Tensor, *, params: RankedListParams
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(rows, cols) of P* and of N* from a dense distance matrix and the candidate pair masks."""
    pos = pos_mask & is_non_trivial(positive_hinge(d, params.negative_boundary, params.margin))
    neg = neg_mask & is_non_trivial(negative_hinge(d, params.negative_boundary))
    pos_rows, pos_cols = torch.nonzero(pos, as_tuple=True)
    neg_rows, neg_cols = torch.nonzero(neg, as_tuple=True)
    return pos_rows, pos_cols, neg_rows, neg_cols
