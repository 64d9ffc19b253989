"""Functional core of the Ranked List Loss.

Wang et al., "Ranked List Loss for Deep Metric Learning", CVPR 2019 (equations 2-5) and its TPAMI 2021
extension. Every function here is a pure tensor function. Matrices are "query x gallery": row ``i`` is the ranked
list of query ``i``, column ``j`` a gallery item. The loss class, the reducer and the miner of this package all
call these functions, so the math exists exactly once.

Conventions
-----------
* ``d``: Euclidean distances (B x R), ``pos_mask`` / ``neg_mask``: the candidate positive / negative pairs of
  each query (labels, or the pairs of a miner), boolean B x R.
* A set that is empty contributes 0 (the paper leaves 1/|P*| undefined there).
* Weights are normalised inside each set with the maximum subtracted first, so no temperature overflows, and
  there is no epsilon in any denominator.
"""

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor


def positive_boundary(alpha: float, margin: float) -> float:
    # eq. 2: positives must lie closer than alpha - m
    return alpha - margin


def positive_hinge(d: Tensor, alpha: float, margin: float) -> Tensor:
    # eq. 2, y_ij = 1: d_ij - (alpha - m)   (the positive part of the pairwise constraint)
    return d - positive_boundary(alpha, margin)


def negative_hinge(d: Tensor, alpha: float) -> Tensor:
    # eq. 2, y_ij = 0: alpha - d_ij
    return alpha - d


def non_trivial_positives(pos_hinge: Tensor, pos_mask: Tensor) -> Tensor:
    # P*_{c,i} = {x_j^c | j != i, d_ij > alpha - m}   (strict inequality)
    return pos_mask & (pos_hinge > 0)


def non_trivial_negatives(neg_hinge: Tensor, neg_mask: Tensor) -> Tensor:
    # N*_{c,i} = {x_j^k | k != c, d_ij < alpha}   (strict inequality)
    return neg_mask & (neg_hinge > 0)


def set_weights(hinge: Tensor, in_set: Tensor, temperature: float) -> Tensor:
    # eq. 4 weights: w_ij = exp(T * hinge_ij) / sum_{k in set} exp(T * hinge_ik), max-shifted, 0 outside the set
    if hinge.shape[-1] == 0:
        return torch.zeros_like(hinge)
    logits = (temperature * hinge).masked_fill(~in_set, float("-inf"))
    shift = logits.detach().amax(dim=1, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    w = torch.exp(logits - shift)
    total = w.sum(dim=1, keepdim=True)
    return w / torch.where(total > 0, total, torch.ones_like(total))


def weighted_set_loss(weights: Tensor, hinge: Tensor, in_set: Tensor) -> Tensor:
    # eq. 3 (L_P, with T_p = 0 a plain mean) and eq. 4 (L_N): sum_{j in set} w_ij * hinge_ij
    return (weights * hinge.masked_fill(~in_set, 0)).sum(dim=1)


def query_loss(loss_p: Tensor, loss_n: Tensor, imbalance: float) -> Tensor:
    # eq. 5 in PML's convention: (1 - lambda) * L_P + lambda * L_N  (CVPR: L_P + lambda * L_N, see README)
    return (1 - imbalance) * loss_p + imbalance * loss_n


class RankedLists(NamedTuple):
    """Per-query pieces of the loss, for one block of queries."""

    losses: Tensor  # (B,) per-query loss, eq. 5
    loss_p: Tensor  # (B,) L_P, eq. 3
    loss_n: Tensor  # (B,) L_N, eq. 4
    w_p: Tensor  # (B, R) normalised positive weights (0 outside P*)
    w_n: Tensor  # (B, R) normalised negative weights (0 outside N*)
    pos_set: Tensor  # (B, R) bool, P*
    neg_set: Tensor  # (B, R) bool, N*


def ranked_lists_from_hinges(
    pos_hinge: Tensor,
    neg_hinge: Tensor,
    pos_mask: Tensor,
    neg_mask: Tensor,
    Tp: float,
    Tn: float,
    imbalance: float,
    detach_weights: bool,
) -> RankedLists:
    """Eqs. 3-5 from the two hinge matrices of eq. 2.

    Differentiable with respect to the hinges. With ``detach_weights`` the set weights are constants (the paper's
    rule); otherwise autograd also differentiates the softmax weights.
    """
    pos_set = non_trivial_positives(pos_hinge, pos_mask)
    neg_set = non_trivial_negatives(neg_hinge, neg_mask)
    w_p = set_weights(pos_hinge.detach() if detach_weights else pos_hinge, pos_set, Tp)
    w_n = set_weights(neg_hinge.detach() if detach_weights else neg_hinge, neg_set, Tn)
    loss_p = weighted_set_loss(w_p, pos_hinge, pos_set)
    loss_n = weighted_set_loss(w_n, neg_hinge, neg_set)
    return RankedLists(query_loss(loss_p, loss_n, imbalance), loss_p, loss_n, w_p, w_n, pos_set, neg_set)


def ranked_lists(
    d: Tensor,
    pos_mask: Tensor,
    neg_mask: Tensor,
    margin: float,
    alpha: float,
    Tp: float,
    Tn: float,
    imbalance: float,
    detach_weights: bool = True,
) -> RankedLists:
    """Eqs. 2-5 from a distance matrix: the whole Ranked List Loss, one value per query (row)."""
    return ranked_lists_from_hinges(
        positive_hinge(d, alpha, margin),
        negative_hinge(d, alpha),
        pos_mask,
        neg_mask,
        Tp,
        Tn,
        imbalance,
        detach_weights,
    )


def hinge_gradients(
    r: RankedLists,
    pos_hinge: Tensor,
    neg_hinge: Tensor,
    Tp: float,
    Tn: float,
    imbalance: float,
    detach_weights: bool,
) -> Tuple[Tensor, Tensor]:
    """d loss_i / d hinge_ij for both sets, in closed form.

    Constant weights (paper, spec 1.2): the normalised weights themselves.
    Differentiable weights (plain autograd): w_ij * (1 + T * (hinge_ij - L_set,i)), spec 1.2.
    """
    g_p, g_n = r.w_p, r.w_n
    if not detach_weights:
        g_p = g_p * (1 + Tp * (pos_hinge - r.loss_p[:, None]))
        g_n = g_n * (1 + Tn * (neg_hinge - r.loss_n[:, None]))
    return (1 - imbalance) * g_p, imbalance * g_n


def distance_gradients(
    d: Tensor,
    pos_mask: Tensor,
    neg_mask: Tensor,
    margin: float,
    alpha: float,
    Tp: float,
    Tn: float,
    imbalance: float,
    detach_weights: bool = True,
) -> Tuple[RankedLists, Tensor]:
    """The loss of every query and d loss_i / d d_ij (B x R), without autograd.

    d hinge_pos / d d = +1 and d hinge_neg / d d = -1 (eq. 2); the two sets are disjoint.
    """
    pos_hinge = positive_hinge(d, alpha, margin)
    neg_hinge = negative_hinge(d, alpha)
    r = ranked_lists_from_hinges(pos_hinge, neg_hinge, pos_mask, neg_mask, Tp, Tn, imbalance, True)
    g_p, g_n = hinge_gradients(r, pos_hinge, neg_hinge, Tp, Tn, imbalance, detach_weights)
    return r, g_p - g_n


def squared_euclidean(query: Tensor, ref: Tensor) -> Tensor:
    # ||q_i - r_j||^2 through the Gram matrix: one matmul
    sq = (query * query).sum(1)[:, None] + (ref * ref).sum(1)[None, :] - 2 * (query @ ref.T)
    return sq.clamp_min_(0)


def refine_small_distances(
    sq: Tensor, query: Tensor, ref: Tensor, threshold: float, budget: int
) -> Optional[Tuple[Tensor, Tensor]]:
    """Recompute the squared distances below ``threshold`` from explicit differences.

    The Gram form loses the small distances to rounding (identical float32 embeddings come out about 3e-4
    apart instead of 0). Near-duplicates are rare, so they are recomputed exactly when there are at most
    ``budget`` of them; returns their (rows, cols) or None when over budget (then the Gram values stand).
    """
    rows, cols = torch.nonzero(sq < threshold, as_tuple=True)
    if rows.numel() == 0 or rows.numel() > budget:
        return None
    sq[rows, cols] = (query[rows] - ref[cols]).pow(2).sum(1)
    return rows, cols
