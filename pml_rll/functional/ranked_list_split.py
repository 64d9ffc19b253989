"""The Ranked List Loss on Euclidean distances, split: positives listed from the labels, negatives in lean panels.

"Ranked List Loss for Deep Metric Learning", CVPR 2019 (eqs. 2-5), both gradient rules. A CPU form for the
regimes where listing every non-trivial pair is slow: large batches, many non-trivial negatives (the dense regime)
and a large reference set (a cross-batch memory). docs/ranked_list_loss.md, section 3.6, describes it step by step.

* Positives (same label) are few per query in metric learning batches (a few samples per class). They are found by
  sorting the labels, never by comparing every pair; their Gram distances are read from the panels on the way
  (near-duplicates recomputed from differences), then the loss, weights (eq. 3) and gradient are computed on lists.
* Negatives (every other pair) are computed in panels of queries x gallery items. One matmul of the augmented
  vectors ``[2 q, -|q|^2, -1] . [g, 1, |g|^2]`` gives ``-d^2`` directly; the same-label pairs of the panel are set
  to ``-inf`` (sparse); one threshold pass sends every pair outside N* (d >= alpha) to a distance so large that
  its weight is cut to exactly 0. Then ``d``, the weight ``e = exp(-Tn d)`` (the constant shift ``Tn * alpha``,
  valid because ``Tn * alpha`` cannot underflow a member's weight), the sums S = sum e and sum e d, and the paper's
  gradient coefficients ``c = e / d`` are whole-panel passes with no mask; the gradient is one matmul of the
  coefficients with the gallery. A panel with few members (a large reference set, easy inputs) is listed instead.
  When the gallery is the batch, only the panels from the diagonal on are computed: weights, coefficients and
  membership are symmetric, so each pair right of the diagonal also counts for its item as a query (half the
  distance matmul and half the elementwise work).
* Near-duplicate pairs (squared Gram distance below ``NEAR_SQUARED_DISTANCE``) are recomputed from explicit
  differences, as on the other paths, and their gradient taken from the differences.

The values are those of the list and dense paths up to floating-point rounding: the boundaries are compared on
Gram distances (the squared boundary is the exact float image of ``d < alpha``), but the augmented matmul rounds
them differently from the other paths' matmul, so a pair within rounding of a boundary may fall on the other side
(as between the list and dense paths). Memory is O(panel), plus the positive lists and, for a listed panel, at
most 1/64 of its pairs times the dimension; near-duplicates beyond 4 per query (collapsed embeddings) keep their
Gram values, as on the list path.

With the paper's rule the gradient is complete at the end of the forward pass; with the autograd rule (weights
differentiated, both ends of every pair moved) the backward pass goes over the panels once more, every query's
normaliser and loss being known by then. For that pass the forward pass keeps the dense panels' distances, up to
``_KEEP_ELEMENTS`` elements in all (64 MiB in float32; the panels beyond are computed again): the autograd rule's
memory is O(min(B x R, that budget)) per call until its backward pass. The kept distances and listed members are
held by the autograd context, not saved with ``save_for_backward``: saved-tensor hooks (offloading, activation
checkpointing) do not see them.

It applies to: labels (not pair masks), float32 or float64,
``1e-6 <= Tn`` with ``Tn * alpha`` at most half of ``-log`` of the dtype's smallest normal number (43.7 in
float32, 354 in float64), ``alpha > 0.02``, and positives (same-label pairs) at most 1/16 of all pairs;
:func:`.ranked_list_euclidean.ranked_list_euclidean` takes another path otherwise.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from ..utils.autograd import closed_form_backward
from ..utils.workspace import Workspace
from .numerics import (
    NEAR_SQUARED_DISTANCE,
    ZERO_DISTANCE_EPS,
    add_pair_product,
    fixed_shift,
    safe_exponent_limit,
    squared_norms,
    unit_coefficients,
)
from .ranked_list import (
    LabelMasks,
    MaskFn,
    is_non_trivial,
    positive_hinge,
    same_label_pairs,
    set_weights,
    weighted_set_loss,
)
from .ranked_list_dense import sync_free_wanted
from .ranked_list_params import RankedListParams

# Gallery = the batch: panels of this many queries against the batch from their diagonal on.
_SAME_BLOCK = 512
# Reference set: blocks of up to this many queries x as many items as fill _BLOCK_ELEMENTS.
_REF_BLOCK_ROWS = 256
_BLOCK_ELEMENTS = 1 << 18
# A block is listed when at most this fraction of its pairs is in N* (judged on the previous block; a listed
# block that turns out denser is processed densely).
_LIST_FRACTION = 1 / 64
# The positives must be sparse: at most this fraction of all pairs has the query's label.
_MAX_POSITIVE_FRACTION = 1 / 16
# Near-duplicates recomputed from explicit differences, per query of a panel (or of the batch, for the positives);
# beyond that many (collapsed embeddings) the Gram values stand, as on the list path: memory stays O(panel).
_NEAR_PER_QUERY = 4
# The autograd rule keeps the dense panels' distances for its second pass up to this many elements in all (64 MiB
# in float32): that pass then skips their matmul and the distance passes; beyond, it computes them again.
_KEEP_ELEMENTS = 1 << 24
# Rows of a panel whose members decide whether the next panel is listed, when N* is not counted.
_COUNT_SAMPLE_ROWS = 16
# Below this Tn the far distance given to the pairs outside N* would overflow when squared.
_MIN_TN = 1e-6
# Pairs outside N* get the exponent -_FAR * limit (limit: the constant-shift bound on Tn * alpha), members at
# least -limit; weights at most exp(-_CUT * limit) are then set to exactly 0. The far exponent stays in the
# normal range of the dtype: an exp that underflows to a subnormal or 0 runs a slow path, 50x slower on a CPU.
_FAR, _CUT = 1.5, 1.25


def split_supported(query: Tensor, masks: MaskFn, *, params: RankedListParams) -> bool:
    """Whether :func:`ranked_list_split` applies (before counting the positives): a CPU outside ``torch.compile``,
    labels, float32/float64, and negative weights with a constant shift."""
    alpha, Tn = params.negative_boundary, params.Tn
    return (
        isinstance(masks, LabelMasks)
        and query.dtype in (torch.float32, torch.float64)  # (the loss computes half precision in float32)
        and not sync_free_wanted(query)
        and Tn >= _MIN_TN
        and fixed_shift(Tn, alpha, query.dtype) is not None
        and alpha * alpha > 4 * NEAR_SQUARED_DISTANCE
    )


@functools.lru_cache(maxsize=64)
def squared_boundary(alpha: float, dtype: torch.dtype) -> float:
    """The smallest float t of ``dtype`` with sqrt(t) >= alpha (in that dtype): ``sq < t`` iff ``sqrt(sq) < alpha``."""
    a = torch.tensor(alpha, dtype=dtype)
    up, down = torch.tensor(math.inf, dtype=dtype), torch.zeros((), dtype=dtype)
    t = a * a
    while bool(torch.sqrt(t) < a):
        t = torch.nextafter(t, up)
    while bool(torch.sqrt(torch.nextafter(t, down)) >= a):
        t = torch.nextafter(t, down)
    return float(t)


class _PositivePart(NamedTuple):
    """P* of every query from its list of same-label pairs (rows ascending)."""

    loss: Tensor  # (B,) L_P, eq. 3
    size: Tensor  # size of P*
    d: Tensor  # distance of each pair
    w: Tensor  # normalised weight of each pair (0 outside P*)
    hinge: Tensor  # d - (alpha - m)
    near: Tensor  # indices of the pairs recomputed from explicit differences


def _positive_part(
    query: Tensor, gallery: Tensor, rows: Tensor, cols: Tensor, sq: Tensor, params: RankedListParams
) -> _PositivePart:
    """L_P of every query (eq. 3) from the pairs' squared Gram distances ``sq``; near-duplicates are recomputed
    from differences (at most 4 per query: beyond, for collapsed embeddings, the Gram values stand)."""
    B = query.shape[0]
    near = torch.nonzero(sq < NEAR_SQUARED_DISTANCE, as_tuple=True)[0]
    if len(near) > _NEAR_PER_QUERY * B:  # collapsed embeddings: the Gram values stand
        near = near[:0]
    sq = sq.index_put((near,), (query[rows[near]] - gallery[cols[near]]).pow(2).sum(1))
    d = sq.clamp_min_(0).sqrt_()
    hinge = positive_hinge(d, params.negative_boundary, params.margin)
    member = is_non_trivial(hinge)
    w = set_weights(hinge, rows, B, params.Tp, member)
    return _PositivePart(weighted_set_loss(w, hinge, rows, B), member.sum(), d, w, hinge, near)


def _pair_terms(
    grad: Tensor, rows: Tensor, cols: Tensor, coef: Tensor, near: Tensor, sides: tuple[Tensor, Tensor]
) -> None:
    """Adds sum_j coef_ij (a_i - b_j) to ``grad`` (``rows`` ascending; ``sides`` = (a, b)): the Gram form, the
    near-duplicate pairs ``near`` from explicit differences; coefficients at distance ~0 must already be 0."""
    a, b = sides
    c_near = coef[near]
    coef = coef.index_fill(0, near, 0.0)  # the Gram form cancels there: the differences carry them
    grad.addcmul_(a, torch.zeros(a.shape[0], dtype=coef.dtype, device=coef.device).index_add_(0, rows, coef)[:, None])
    if len(rows):
        add_pair_product(grad, rows, cols, coef, b, alpha=-1)
    grad.index_add_(0, rows[near], c_near[:, None] * (a[rows[near]] - b[cols[near]]))


class _Block(NamedTuple):
    """Queries ``I`` against gallery items ``J``: their augmented vectors ``qa``, ``ga``; ``sides``: the queries
    and the items; ``pairs``: (rows, cols) in the block of the same-label pairs found there and their indices in
    the pair list. ``mirror``: the gallery is the batch and the block's columns from ``mirror`` on lie right of the
    diagonal: those pairs also count for their items as queries (weights, coefficients and membership are
    symmetric)."""

    I: slice
    J: slice
    mirror: int | None
    qa: Tensor
    ga: Tensor
    sides: tuple[Tensor, Tensor]
    pairs: tuple[Tensor, Tensor, Tensor]


def _negative_squares(blk: _Block, ws: Workspace, keep: Tensor | None, out: Tensor | None = None) -> Tensor:
    """-d^2 of a block in Gram form (one matmul of the augmented vectors, into ``out`` or a workspace buffer), the
    same-label pairs at -inf (out of every N*); their values are first written into ``keep`` at their pair
    indices, when given."""
    out = ws.get("nsq", blk.qa.shape[0], blk.ga.shape[0]) if out is None else out
    nsq = torch.mm(blk.qa, blk.ga.T, out=out)
    rows, cols, index = blk.pairs
    if keep is not None:
        keep[index] = nsq[rows, cols]
    return nsq.index_put_((rows, cols), nsq.new_tensor(-math.inf))


class _NegativeRule(NamedTuple):
    """How a panel's pairs become weights: squared boundary t, the far squared distance and the weight cut."""

    Tn: float
    t: float
    far_sq: float
    cut: float

    @staticmethod
    def of(params: RankedListParams, dtype: torch.dtype) -> _NegativeRule:
        limit = safe_exponent_limit(dtype)
        far = _FAR * limit / params.Tn
        return _NegativeRule(
            params.Tn, squared_boundary(params.negative_boundary, dtype), far * far, math.exp(-_CUT * limit)
        )


def _panel_weights(
    nsq: Tensor, sides: tuple[Tensor, Tensor], rule: _NegativeRule, ws: Workspace
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None, bool]:
    """A panel's -d^2 (same-label pairs already at -inf) -> (d, weights e = exp(-Tn d) on N* and exactly 0
    elsewhere, near-duplicates (rows, cols, differences) or None, collapsed). ``nsq`` is overwritten with d.

    Near-duplicates are recomputed from explicit differences; beyond 4 per query (collapsed) the Gram values stand.
    """
    b, c = nsq.shape
    near: tuple[Tensor, Tensor, Tensor] | None = None
    collapsed = False
    if bool(nsq.max() > -NEAR_SQUARED_DISTANCE):  # rare: recompute from explicit differences
        is_near = nsq > -NEAR_SQUARED_DISTANCE
        collapsed = int(is_near.sum()) > _NEAR_PER_QUERY * b
        if collapsed:
            nsq.clamp_max_(0.0)  # a Gram distance below 0 is 0
        else:
            rows, cols = torch.nonzero(is_near, as_tuple=True)
            diff = sides[0][rows] - sides[1][cols]
            nsq[rows, cols] = diff.pow(2).sum(1).neg_()
            near = (rows, cols, diff)
    # pairs outside N* (d >= alpha, positives, the query itself) move to a distance whose weight is exactly 0
    d = torch.threshold_(nsq, -rule.t, -rule.far_sq).neg_().sqrt_()
    return d, _weights(d, rule, ws), near, collapsed


def _weights(d: Tensor, rule: _NegativeRule, ws: Workspace) -> Tensor:
    """e = exp(-Tn d) on N*, exactly 0 on the pairs moved to the far distance (a workspace buffer)."""
    return torch.threshold_(torch.mul(d, -rule.Tn, out=ws.get("e", *d.shape)).exp_(), rule.cut, 0.0)


def _panel_coefficients(d: Tensor, e: Tensor, collapsed: bool, ws: Workspace) -> Tensor:
    """e / d, 0 where d is within rounding of 0 (only possible when the panel is collapsed)."""
    coef = torch.div(e, d, out=ws.get("c", *d.shape))
    if collapsed:  # distances within rounding of 0 remain: their direction is 0
        coef.masked_fill_(d <= ZERO_DISTANCE_EPS * torch.finfo(d.dtype).eps, 0.0)
    return coef


class _KeptPanel(NamedTuple):
    """A dense panel's distances (pairs outside N* at the far distance), kept for the autograd rule's second pass."""

    d: Tensor
    near: tuple[Tensor, Tensor, Tensor] | None  # near-duplicates: rows, cols, differences
    collapsed: bool


class _NegativeSums:
    """Per-query running sums over N*, fed panel by panel: S = sum e, sum e d, the gradient's parts
    C = sum c, N = -sum c g_j (matmuls) and E = sum c (q_i - g_j) (explicit differences), c = e / d; the size of
    N*; the Gram values of the same-label pairs, met on the way."""

    def __init__(
        self, query: Tensor, params: RankedListParams, need_grad: bool, n: int, counting: bool, keep_for_backward: bool
    ) -> None:
        B, D = query.shape
        # the autograd rule's second pass reuses the listed blocks' members (block number -> rows, cols, d, e) and,
        # within _KEEP_ELEMENTS, the dense panels' distances (block number -> d, near-duplicates, collapsed)
        self.keep_for_backward = keep_for_backward
        self.listed: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        self.kept: dict[int, _KeptPanel] = {}
        self.kept_elements = 0
        self.block_no = -1
        self.counting = counting  # the exact size of N* (without it, a sample of rows guides the listing)
        self.pair_nsq = query.new_empty(n)  # -d^2 (Gram form) of every same-label pair
        self.need_grad = need_grad
        self.rule = _NegativeRule.of(params, query.dtype)
        self.ws = Workspace(_BLOCK_ELEMENTS, query)
        self.S, self.ED, self.C = query.new_zeros(B), query.new_zeros(B), query.new_zeros(B)
        self.N: Tensor | None = None
        if need_grad:  # (a new tensor: the gradient is assembled in it)
            self.N = query.new_zeros(B, D)
        self.E: Tensor | None = None  # allocated at the first explicit difference
        self.count = 0
        self.listing = False  # how the next block is processed (from the density of the last one)

    def block(self, blk: _Block) -> None:
        """One block: the same-label pairs' Gram values kept, N*'s sums added (listed or whole-block passes)."""
        I, J, mirror, sides = blk.I, blk.J, blk.mirror, blk.sides
        self.block_no += 1
        size = blk.qa.shape[0] * blk.ga.shape[0]
        keep = self.keep_for_backward and not self.listing and self.kept_elements + size <= _KEEP_ELEMENTS
        nsq = _negative_squares(
            blk, self.ws, self.pair_nsq, blk.qa.new_empty(size).view(-1, blk.ga.shape[0]) if keep else None
        )
        if not (self.listing and self._listed(I, J, mirror, nsq, sides)):
            self._dense(I, J, mirror, nsq, sides, keep)

    def _exact(
        self, I: slice, J: slice, mirror: int | None, pairs: tuple[Tensor, Tensor], coef: Tensor, diff: Tensor
    ) -> None:
        """Gradient terms c (q_i - g_j) of listed pairs from their explicit differences (both ends if mirrored)."""
        rows, cols = pairs
        if self.E is None:
            self.E = torch.zeros_like(self.N) if self.N is not None else None
        assert self.E is not None
        term = coef[:, None] * diff
        self.E.index_add_(0, rows + I.start, term)
        if mirror is not None:  # the pair seen from the item: coefficient c_ji = c_ij, direction g_j - q_i
            sel = cols >= mirror
            self.E.index_add_(0, cols[sel] + J.start, term[sel], alpha=-1)

    def _listed(self, I: slice, J: slice, mirror: int | None, nsq: Tensor, sides: tuple[Tensor, Tensor]) -> bool:
        """The block's members listed; False (nothing done) when they are too many for a list."""
        rows, cols = torch.nonzero(nsq > -self.rule.t, as_tuple=True)
        n = len(rows)
        if n > _LIST_FRACTION * nsq.numel():
            self.listing = False
            return False
        diff = sides[0][rows] - sides[1][cols]
        sq = nsq[rows, cols].neg_()
        d = torch.where(sq < NEAR_SQUARED_DISTANCE, diff.pow(2).sum(1), sq).sqrt_()
        e = torch.exp(d * -self.rule.Tn)
        ed = e * d
        if self.keep_for_backward:
            self.listed[self.block_no] = (rows, cols, d, e)
        self.S.index_add_(0, rows + I.start, e)
        self.ED.index_add_(0, rows + I.start, ed)
        self.count += n
        if mirror is not None:
            sel = cols >= mirror
            self.S.index_add_(0, cols[sel] + J.start, e[sel])
            self.ED.index_add_(0, cols[sel] + J.start, ed[sel])
            self.count += int(sel.sum())
        if self.need_grad:
            tiny = d <= ZERO_DISTANCE_EPS * torch.finfo(d.dtype).eps
            coef = torch.where(tiny, 0.0, e / d.masked_fill(tiny, 1.0))
            self._exact(I, J, mirror, (rows, cols), coef, diff)
        return True

    def _dense(
        self, I: slice, J: slice, mirror: int | None, nsq: Tensor, sides: tuple[Tensor, Tensor], keep: bool
    ) -> None:
        b, c = nsq.shape
        d, e, near, collapsed = _panel_weights(nsq, sides, self.rule, self.ws)
        if keep:  # (d is then a new tensor, not a workspace buffer)
            self.kept[self.block_no] = _KeptPanel(d, near, collapsed)
            self.kept_elements += d.numel()
        M = slice(J.start + (mirror or 0), J.stop)  # the items that are also queries of mirrored pairs
        right = e[:, mirror:] if mirror is not None else None
        self.S[I] += e.sum(1)
        if right is not None:
            self.S[M] += right.sum(0)
        # ceil(e): 1 on N* (where e is in (0, 1]), 0 elsewhere
        if self.counting:
            ones = torch.ceil(e, out=self.ws.get("c", b, c))
            members = int(ones.sum())
            self.count += members + (int(ones[:, mirror:].sum()) if mirror is not None else 0)
            self.listing = members <= _LIST_FRACTION * e.numel()
        else:
            sample = e[:_COUNT_SAMPLE_ROWS]
            self.listing = int(torch.ceil(sample).sum()) <= _LIST_FRACTION * sample.numel()
        if self.N is not None:
            coef = _panel_coefficients(d, e, collapsed, self.ws)
            if near is not None:
                rows, cols, diff = near
                c_near = unit_coefficients(e[rows, cols], d[rows, cols])
                coef[rows, cols] = 0.0  # their Gram form cancels: the differences carry them
                self._exact(I, J, mirror, (rows, cols), c_near, diff)
            self.C[I] += coef.sum(1)
            self.N[I].addmm_(coef, sides[1], alpha=-1)
            if mirror is not None:
                self.C[M] += coef[:, mirror:].sum(0)
                self.N[M].addmm_(coef[:, mirror:].T, sides[0], alpha=-1)
        ed = torch.mul(d, e, out=self.ws.get("c", b, c)) if keep else d.mul_(e)
        self.ED[I] += ed.sum(1)
        if mirror is not None:
            self.ED[M] += ed[:, mirror:].sum(0)

    def loss(self, alpha: float) -> tuple[Tensor, Tensor]:
        """L_N of every query (eq. 4) and the normaliser S (1 where N* is empty)."""
        S = torch.where(self.S == 0, 1.0, self.S)
        return torch.where(self.S == 0, 0.0, alpha - self.ED / S), S

    def gradient(self, query: Tensor, scale: Tensor) -> Tensor:
        """scale_i * sum_j c_ij (q_i - g_j) over N*, assembled in place of N (returned; the sums end there)."""
        assert self.N is not None
        grad = self.N.mul_(scale[:, None])
        grad.addcmul_(query, (scale * self.C)[:, None])
        if self.E is not None:
            grad.addcmul_(self.E, scale[:, None])
        return grad


def _augmented(x: Tensor, x_sq: Tensor, query_side: bool, out: Tensor | None) -> Tensor:
    """[2 x, -|x|^2, -1] (query side) or [x, 1, |x|^2]: their dot product is -||q - g||^2 (written into ``out``)."""
    D = x.shape[1]
    out = x.new_empty(x.shape[0], D + 2) if out is None else out
    if query_side:
        torch.mul(x, 2, out=out[:, :D])
        torch.neg(x_sq, out=out[:, D])
        out[:, D + 1] = -1.0
    else:
        out[:, :D] = x
        out[:, D] = 1.0
        out[:, D + 1] = x_sq
    return out


def _pairs_by_block(
    rows: Tensor, cols: Tensor, *, same: bool, rows_per_block: int, cols_per_block: int, row_blocks: int
) -> Callable[[int], tuple[Tensor, Tensor, Tensor]]:
    """Where each same-label pair lies in the blocks, in the order the blocks are computed: a function of the
    block number returning (rows, cols) in that block and the pairs' indices.

    Gallery = batch (panels of ``rows_per_block`` queries from their diagonal on): a pair left of its query's
    panel is found, mirrored, in the panel of its item. Reference set: blocks of ``rows_per_block`` queries x
    ``cols_per_block`` items, the gallery chunks outermost (``row_blocks`` blocks per chunk).
    """
    if same:
        direct = cols >= rows - rows % rows_per_block
        a, b = torch.where(direct, rows, cols), torch.where(direct, cols, rows)  # (query, item) in the panel
        block = a // rows_per_block
        start = block * rows_per_block
        a, b = a - start, b - start
    else:
        block = (cols // cols_per_block) * row_blocks + rows // rows_per_block
        a, b = rows % rows_per_block, cols % cols_per_block
    order = torch.sort(block, stable=True).indices
    a, b = a[order], b[order]
    bounds = [0, *torch.cumsum(torch.bincount(block), 0).tolist()] if len(block) else [0]

    def found(k: int) -> tuple[Tensor, Tensor, Tensor]:
        lo, hi = bounds[min(k, len(bounds) - 1)], bounds[min(k + 1, len(bounds) - 1)]
        return a[lo:hi], b[lo:hi], order[lo:hi]

    return found


class _Panels(NamedTuple):
    """The panel layout of one call: which blocks, in which order, with their augmented vectors."""

    same: bool
    qa: Tensor
    q_sq: Tensor  # squared norms of the queries
    query: Tensor
    gallery: Tensor
    rows: Tensor  # the same-label pairs, rows ascending
    cols: Tensor

    def run(self, visit: Callable[[_Block], None], ws: Workspace) -> None:
        """Calls ``visit`` on every block, in order."""
        query, gallery, qa = self.query, self.gallery, self.qa
        (B, D), R = query.shape, gallery.shape[0]
        if self.same:  # panels of rows against the batch from their diagonal on: one matmul per panel
            ga = _augmented(query, self.q_sq, False, ws.get("ga", B, D + 2))
            size = min(B, _SAME_BLOCK)
            found = _pairs_by_block(
                self.rows, self.cols, same=True, rows_per_block=size, cols_per_block=B, row_blocks=0
            )
            for k, i in enumerate(range(0, B, size)):
                I, J = slice(i, min(B, i + size)), slice(i, B)
                visit(_Block(I, J, I.stop - i, qa[I], ga[J], (query[I], query[J]), found(k)))
            return
        g_sq = squared_norms(gallery)
        b = min(B, _REF_BLOCK_ROWS)
        c = max(1, _BLOCK_ELEMENTS // b)
        row_blocks = -(-B // b)
        found = _pairs_by_block(
            self.rows, self.cols, same=False, rows_per_block=b, cols_per_block=c, row_blocks=row_blocks
        )
        k = 0
        for j in range(0, R, c):  # each chunk of the reference set prepared once
            J = slice(j, min(R, j + c))
            ga = _augmented(gallery[J], g_sq[J], False, ws.get("ga", J.stop - j, D + 2))
            for i in range(0, B, b):
                I = slice(i, min(B, i + b))
                visit(_Block(I, J, None, qa[I], ga, (query[I], gallery[J]), found(k)))
                k += 1

    @staticmethod
    def of(query: Tensor, ref: Tensor | None, rows: Tensor, cols: Tensor, ws: Workspace) -> _Panels:
        B, D = query.shape
        q_sq = squared_norms(query)
        qa = _augmented(query, q_sq, True, ws.get("qa", B, D + 2))
        return _Panels(ref is None, qa, q_sq, query, query if ref is None else ref, rows, cols)


class _SplitState(NamedTuple):
    """What the autograd rule's backward pass needs from the forward pass."""

    S: Tensor  # (B,) normaliser of N* (1 where empty)
    loss_n: Tensor  # (B,) L_N
    rows: Tensor  # positive pairs (the query itself excluded), rows ascending
    cols: Tensor
    positives: _PositivePart
    listed: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]]  # the listed blocks' members: rows, cols, d, e
    kept: dict[int, _KeptPanel]  # dense panels' distances (taken out by the second pass as it uses them)


def _split_forward(
    query: Tensor,
    ref: Tensor | None,
    pairs: tuple[Tensor, Tensor, Tensor],
    params: RankedListParams,
    need_grad: bool,
    *,
    counting: bool = True,
    keep_for_backward: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor, int, _SplitState]:
    """(losses, paper gradient or None, size of P*, size of N*, state); ``pairs``: the same-label pairs."""
    same = ref is None
    gallery = query if ref is None else ref
    rows, cols, _ = pairs
    sums = _NegativeSums(query, params, need_grad, len(rows), counting, keep_for_backward)
    _Panels.of(query, ref, rows, cols, sums.ws).run(sums.block, sums.ws)
    lam = params.imbalance
    loss_n, S = sums.loss(params.negative_boundary)
    other = rows != cols if same else slice(None)  # a query is never its own positive
    pr, pc = rows[other], cols[other]
    pos = _positive_part(query, gallery, pr, pc, sums.pair_nsq[other].neg_(), params)
    losses = (1 - lam) * pos.loss + lam * loss_n
    state = _SplitState(S, loss_n, pr, pc, pos, sums.listed, sums.kept)
    if not need_grad:
        return losses, None, pos.size, sums.count, state
    # (1 - lambda) sum_P w / d (q_i - g_j) - lambda sum_N w / d (q_i - g_j), w the normalised weights
    grad = sums.gradient(query, -lam / S)
    _pair_terms(grad, pr, pc, unit_coefficients(pos.w, pos.d).mul_(1 - lam), pos.near, (query, gallery))
    return losses, grad, pos.size, sums.count, state


class _AutogradPass:
    """The plain derivative of the losses (``gradient="autograd"``): a second pass over the panels, once every
    query's loss and normaliser are known. Weights are differentiated and both ends of every pair move.

    d loss_i / d d_ij = -lambda e_ij / S_i (1 + Tn (alpha - d_ij - L_N,i)) on N* (docs/ranked_list_loss.md, 2.2),
    times the upstream gradient of loss_i. With the batch as gallery a pair moves its two ends for two losses, and
    the combined coefficient of (i, j) is symmetric: each panel serves both of its ends, as in the forward pass.
    """

    def __init__(
        self,
        query: Tensor,
        gallery: Tensor,
        same: bool,
        ref_grad: bool,
        params: RankedListParams,
        state: _SplitState,
        *,
        grad_losses: Tensor,
    ) -> None:
        lam, alpha = params.imbalance, params.negative_boundary
        self.rule = _NegativeRule.of(params, query.dtype)
        self.A = -lam * grad_losses / state.S  # per query: the constant factor of its coefficients
        self.u = self.A * (1 + params.Tn * (alpha - state.loss_n))
        self.same = same
        self.grad_q = torch.zeros_like(query)
        self.grad_g = torch.zeros_like(gallery) if not same and ref_grad else None
        self.ws = Workspace(_BLOCK_ELEMENTS, query)
        self.listed, self.kept, self.block_no = state.listed, state.kept, -1

    def block(self, blk: _Block) -> None:
        """One block's terms of the derivative: its listed members, or every pair of it computed again."""
        I, J, mirror, sides = blk.I, blk.J, blk.mirror, blk.sides
        self.block_no += 1
        if self.block_no in self.listed:
            self._listed(blk, *self.listed[self.block_no])
            return
        b, c = blk.qa.shape[0], blk.ga.shape[0]
        kept = self.kept.pop(self.block_no, None)  # (a second backward pass computes it again)
        if kept is not None:
            d, near, collapsed = kept
            e = _weights(d, self.rule, self.ws)
        else:
            nsq = _negative_squares(blk, self.ws, None)
            d, e, near, collapsed = _panel_weights(nsq, sides, self.rule, self.ws)
        coef = _panel_coefficients(d, e, collapsed, self.ws)
        Tn = self.rule.Tn
        # k_ij / d_ij = u_i e / d - Tn A_i e (+ the same for j when the pair also moves j's loss)
        k = torch.mul(coef, self.u[I][:, None], out=self.ws.get("k", b, c))
        k.addcmul_(e, self.A[I][:, None], value=-Tn)
        if self.same:
            k.addcmul_(coef, self.u[J][None, :]).addcmul_(e, self.A[J][None, :], value=-Tn)
        q, g = sides
        if near is not None:  # the Gram form cancels there: explicit differences
            rows, cols, diff = near
            tiny = d[rows, cols] <= ZERO_DISTANCE_EPS * torch.finfo(d.dtype).eps  # direction undefined: 0
            term = torch.where(tiny, 0.0, k[rows, cols])[:, None] * diff
            k[rows, cols] = 0.0
            self.grad_q.index_add_(0, rows + I.start, term)
            if self.same:
                keep = cols >= (mirror if mirror is not None else 0)
                self.grad_q.index_add_(0, cols[keep] + J.start, term[keep], alpha=-1)
            elif self.grad_g is not None:
                self.grad_g.index_add_(0, cols + J.start, term, alpha=-1)
        self.grad_q[I].addcmul_(q, k.sum(1)[:, None]).addmm_(k, g, alpha=-1)
        if self.same and mirror is not None:
            M, right = slice(J.start + mirror, J.stop), k[:, mirror:]
            self.grad_q[M].addcmul_(g[mirror:], right.sum(0)[:, None]).addmm_(right.T, q, alpha=-1)
        elif self.grad_g is not None:
            self.grad_g[J].addcmul_(g, k.sum(0)[:, None]).addmm_(k.T, q, alpha=-1)

    def _listed(self, blk: _Block, rows: Tensor, cols: Tensor, d: Tensor, e: Tensor) -> None:
        """A block whose members the forward pass listed: their terms from explicit differences."""
        I, J, mirror = blk.I, blk.J, blk.mirror
        r, c = rows + I.start, cols + J.start
        u, A = self.u[r], self.A[r]
        if self.same:
            u, A = u + self.u[c], A + self.A[c]
        k = unit_coefficients(e * u, d) - self.rule.Tn * e * A
        k = torch.where(d <= ZERO_DISTANCE_EPS * torch.finfo(d.dtype).eps, 0.0, k)  # direction undefined: 0
        term = k[:, None] * (blk.sides[0][rows] - blk.sides[1][cols])
        self.grad_q.index_add_(0, r, term)
        if self.same and mirror is not None:
            keep = cols >= mirror  # right of the diagonal block: the item's own entry is in no block
            self.grad_q.index_add_(0, c[keep], term[keep], alpha=-1)
        elif self.grad_g is not None:
            self.grad_g.index_add_(0, c, term, alpha=-1)

    def positives(
        self, query: Tensor, gallery: Tensor, params: RankedListParams, state: _SplitState, grad_losses: Tensor
    ) -> None:
        """The positive pairs' terms: w_ij (1 + Tp (hinge_ij - L_P,i)), both ends."""
        pos, pr, pc = state.positives, state.rows, state.cols
        k = pos.w * (1 + params.Tp * (pos.hinge - pos.loss[pr])) * ((1 - params.imbalance) * grad_losses[pr])
        coef = unit_coefficients(k, pos.d)
        _pair_terms(self.grad_q, pr, pc, coef, pos.near, (query, gallery))
        target = self.grad_q if self.same else self.grad_g
        if target is not None:  # the item's end: sum_i coef_ij (g_j - q_i), the pairs grouped by item
            order = torch.sort(pc, stable=True).indices
            near = torch.zeros_like(pr, dtype=torch.bool).index_fill_(0, pos.near, True)[order]
            _pair_terms(
                target, pc[order], pr[order], coef[order], torch.nonzero(near, as_tuple=True)[0], (gallery, query)
            )


class _RankedListSplit(torch.autograd.Function):
    """Forward: losses, and the paper's gradient (weights constant, the gallery fixed), computed on the way.
    Backward: scales it; for the autograd rule, a second pass over the panels (:class:`_AutogradPass`)."""

    @staticmethod
    def forward(  # noqa: PLR0917 (Function.apply passes its arguments by position)
        ctx: Any,
        query: Tensor,
        ref: Tensor | None,
        pairs: tuple[Tensor, Tensor, Tensor],
        params: RankedListParams,
        paper: bool,
        need_grad: bool,
        counting: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        paper_grad = need_grad and paper
        keep = need_grad and not paper
        losses, grad, num_pos, num_neg, state = _split_forward(
            query, ref, pairs, params, paper_grad, counting=counting, keep_for_backward=keep
        )
        ctx.paper = paper
        if grad is not None:
            ctx.save_for_backward(grad)
        elif need_grad:  # the autograd rule: what its second pass needs
            ctx.save_for_backward(query, query if ref is None else ref)
            ctx.rest = (ref is None, pairs, params, state)
        n_pos, n_neg = num_pos.long(), torch.tensor(num_neg if counting else -1, dtype=torch.long)
        ctx.mark_non_differentiable(n_pos, n_neg)
        return losses, n_pos, n_neg

    @staticmethod
    @closed_form_backward("the Ranked List Loss (split path)")
    def backward(ctx: Any, grad_losses: Tensor, _gp: Tensor | None, _gn: Tensor | None) -> tuple[Tensor | None, ...]:
        if ctx.paper:
            (grad,) = ctx.saved_tensors
            return grad * grad_losses[:, None], None, None, None, None, None, None
        query, gallery = ctx.saved_tensors
        same, pairs, params, state = ctx.rest
        second = _AutogradPass(query, gallery, same, ctx.needs_input_grad[1], params, state, grad_losses=grad_losses)
        _Panels.of(query, None if same else gallery, pairs[0], pairs[1], second.ws).run(second.block, second.ws)
        second.positives(query, gallery, params, state, grad_losses)
        return second.grad_q, second.grad_g, None, None, None, None, None


SamePairs = tuple[Tensor, Tensor, Tensor]  # (rows, cols, row_starts) of the same-label pairs (same_label_pairs)


def sparse_positives(labels: LabelMasks, num_queries: int, num_items: int) -> SamePairs | None:
    """The same-label pairs, found by sorting, when they are sparse enough for :func:`ranked_list_split` (at most
    1/16 of all pairs); None, before listing them, otherwise. Reads the number of pairs on the host."""
    max_pairs = int(_MAX_POSITIVE_FRACTION * num_queries * num_items)
    return same_label_pairs(labels.labels, labels.ref_labels, max_pairs=max_pairs)


def ranked_list_split(
    query: Tensor,
    ref: Tensor | None,
    labels: LabelMasks,
    *,
    params: RankedListParams,
    paper: bool,
    count_negatives: bool = True,
    positives: SamePairs | None = None,
) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """Per-query Ranked List Loss, split form (see the module docstring); same contract as the other paths.

    The caller checks :func:`split_supported` first. ``positives``: the result of :func:`sparse_positives` when
    the caller has it already. Returns None, having computed nothing but the same-label pairs (by sorting), when
    they are not sparse. ``paper=True``: the paper's gradient, complete at the end of the forward pass;
    ``paper=False``: the exact derivative, from a second pass over the panels in the backward pass.
    ``count_negatives=False``: the size of N* is not computed (None; a few percent of the time).
    """
    need_grad = torch.is_grad_enabled() and (query.requires_grad or (ref is not None and ref.requires_grad))
    if positives is None:
        positives = sparse_positives(labels, query.shape[0], query.shape[0] if ref is None else ref.shape[0])
    if positives is None:
        return None
    losses, n_pos, n_neg = _RankedListSplit.apply(query, ref, positives, params, paper, need_grad, count_negatives)
    return losses, n_pos, n_neg if count_negatives else None
