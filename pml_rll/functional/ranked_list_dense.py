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
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from ..utils.autograd import closed_form_backward
from ..utils.compat import is_compiling
from ..utils.workspace import Workspace
from .numerics import NEAR_SQUARED_DISTANCE, ZERO_DISTANCE_EPS, fixed_shift, squared_norms
from .ranked_list import MaskFn
from .ranked_list_params import RankedListParams

# Near-duplicates recomputed exactly per query without synchronising (the query itself comes on top when the
# gallery is the batch). On a CPU, where reading a value on the host costs nothing, every near-duplicate is.
NEAR_PER_QUERY = 4
# Elements per tile: cache-sized on a CPU. On a GPU, where the loss is bound by kernel launches, one large tile (a
# 4096 x 4096 batch, or 256 queries x 65,536 references, in one go); a tile's temporaries are the loss's memory
# (about 500 MiB at 2^24 elements in float32; 2^22 measured 140 MiB but 2.5-4x the time on an H100).
_TILE_ELEMENTS_CPU = 1 << 19
_TILE_ELEMENTS_CUDA = 1 << 24
# On a CPU, a tile's gradient product lists its pairs when at most this fraction of them has a coefficient.
_SPARSE_PRODUCT = 1 / 64
# At least this many queries per tile (a wider gallery is then cut into chunks): an efficient matmul.
_MIN_TILE_ROWS = 128
# CPU, gallery = batch: compute each Gram block once and reuse its transpose (switch kept for measurements).
_SYMMETRIC = True


def sync_free_wanted(x: Tensor) -> bool:
    """Where the dense path is always taken and must not synchronise: on CUDA, and while ``torch.compile`` traces."""
    return x.is_cuda or is_compiling()


class _Near(NamedTuple):
    """The near-duplicate pairs of a tile, recomputed from explicit differences."""

    rows: Tensor  # (n,) tile rows
    cols: Tensor  # (n,) tile columns
    keep: Tensor  # (n,) bool: really near (a fixed-size list may hold others, left as they were)
    diff: Tensor  # (n, D) q_i - g_j


class _Tile(NamedTuple):
    """One tile: distances, 1/0 member matrices of P* and N*, near-duplicates."""

    d: Tensor
    member_p: Tensor
    member_n: Tensor
    near: _Near
    diag: int | None  # the gallery is the batch: entry (r, r + diag) is the query itself


def _near_duplicates(sq: Tensor, q: Tensor, g: Tensor, sync_free: bool, diag: int | None) -> _Near:
    """Recompute the squared distances of near-duplicate pairs in ``sq`` (in place) from explicit differences.

    Sync-free: the ``NEAR_PER_QUERY`` smallest of each row (a fixed-size ``topk``). Otherwise all of them, found
    after a cheap check of the row minima.
    """
    if sync_free:
        if diag is not None:
            sq.diagonal(diag).fill_(0.0)  # the query itself: exactly 0, one of the k
        k = min(NEAR_PER_QUERY + (1 if diag is not None else 0), sq.shape[1])
        vals, idx = torch.topk(sq, k, dim=1, largest=False, sorted=False)
        rows = torch.arange(sq.shape[0], device=sq.device)[:, None].expand(-1, k).reshape(-1)
        cols, vals = idx.reshape(-1), vals.reshape(-1)
        diff = q[rows] - g[cols]
        keep = vals < NEAR_SQUARED_DISTANCE
        sq.index_put_((rows, cols), torch.where(keep, diff.pow(2).sum(1), vals))
        return _Near(rows, cols, keep, diff)
    if diag is not None:
        sq.diagonal(diag).fill_(math.inf)  # not a near-duplicate to recompute: exactly 0, set below
    if bool((sq.amin(1) < NEAR_SQUARED_DISTANCE).any()):
        rows, cols = torch.nonzero(sq < NEAR_SQUARED_DISTANCE, as_tuple=True)
    else:
        rows = cols = torch.zeros(0, dtype=torch.long, device=sq.device)
    diff = q[rows] - g[cols]
    sq.index_put_((rows, cols), diff.pow(2).sum(1))
    if diag is not None:
        sq.diagonal(diag).fill_(0.0)
    return _Near(rows, cols, torch.ones_like(rows, dtype=torch.bool), diff)


class _SymmetricGram:
    """CPU, gallery = the batch, whole rows per tile: each Gram block is computed once; a block left of the
    diagonal is the transpose of one computed for an earlier block of queries (half the forward matmul)."""

    def __init__(self, x: Tensor, x_sq: Tensor) -> None:
        self.x, self.x_sq = x, x_sq
        self.upper: list[tuple[int, Tensor]] = []  # (first query, its block against the gallery from there on)

    def squared(self, rows: slice, out: Tensor | None) -> Tensor:
        """Squared Gram distances of the queries ``rows`` to the whole batch, into ``out`` when given."""
        s, e = rows.start, rows.stop
        upper = self.x[s:e] @ self.x[s:].T
        out = upper.new_empty(e - s, self.x.shape[0]) if out is None else out
        torch.add(self.x_sq[None, s:], upper, alpha=-2, out=out[:, s:])
        for start, block in self.upper:
            stop = start + block.shape[0]
            torch.add(self.x_sq[None, start:stop], block[:, s - start : e - start].T, alpha=-2, out=out[:, start:stop])
        self.upper.append((s, upper))
        return out.add_(self.x_sq[s:e, None])


def _indicator(op: Callable[..., Tensor], x: Tensor, value: float, out: Tensor | None) -> Tensor:
    """1/0 in the dtype of ``x`` where ``op(x, value)`` holds, written into ``out`` when given."""
    return op(x, value).to(x.dtype) if out is None else op(x, value, out=out)


class _Problem(NamedTuple):
    """What every tile of one call shares: the gallery, its squared norms, the candidate pairs, the settings."""

    gallery: Tensor
    g_sq: Tensor
    masks: MaskFn
    params: RankedListParams
    same: bool  # the gallery is the query batch
    sync_free: bool


def _tile(
    q: Tensor, q_sq: Tensor, rows: slice, cols: slice, pb: _Problem, ws: Workspace, *, gram: _SymmetricGram | None
) -> _Tile:
    """Distances and members of the tile ``rows`` x ``cols`` (``q``, ``q_sq``: its queries and their norms)."""
    g, params, sync_free = pb.gallery[cols], pb.params, pb.sync_free
    b, c = q.shape[0], g.shape[0]
    offset = rows.start - cols.start
    diag = offset if pb.same and -b < offset < c else None
    if gram is not None:
        sq = gram.squared(rows, ws.get("d", b, c))
    else:
        sq = torch.addmm(pb.g_sq[None, cols], q, g.T, alpha=-2, out=ws.get("d", b, c)).add_(q_sq[:, None])
    near = _near_duplicates(sq, q, g, sync_free, diag)
    d = sq.clamp_min_(0).sqrt_()
    # 1/0 matrices in the compute dtype: on a CPU, float arithmetic is several times faster than bool masking
    pos, neg = pb.masks(rows, cols, dtype=None if sync_free else d.dtype, out=ws.get("pos", b, c))
    pos = pos.to(d.dtype)
    member_p = _indicator(torch.gt, d, params.positive_boundary, ws.get("member_p", b, c)).mul_(pos)
    if diag is not None:
        member_p.diagonal(diag).fill_(0.0)  # a query is never its own positive
    if neg is None:  # every non-positive: a positive is pushed beyond alpha before the comparison
        shifted = torch.add(d, pos, alpha=params.negative_boundary + 1, out=ws.get("member_n", b, c))
        member_n = _indicator(torch.lt, shifted, params.negative_boundary, ws.get("member_n", b, c))
    else:
        member_n = _indicator(torch.lt, d, params.negative_boundary, ws.get("member_n", b, c))
        member_n.mul_(neg.to(d.dtype))
    return _Tile(d, member_p, member_n, near, diag)


class _SetState:
    """Running per-query sums of one set (P* or N*): shift, normaliser S, weighted hinge H, gradient G.

    The set's hinge is ``sign * d + offset`` (P*: d - (alpha - m); N*: alpha - d) with temperature T.
    """

    def __init__(
        self, b: int, like: Tensor, T: float, sign: float, offset: float, shift: float | None, *, dim: int | None
    ) -> None:
        self.T, self.sign, self.offset, self.fixed = T, sign, offset, shift
        self.shift = like.new_full((b,), shift if shift is not None else -math.inf)
        self.S = like.new_zeros(b)
        self.H = like.new_zeros(b)
        self.G = like.new_zeros(b, dim) if dim is not None else None

    def weights(self, d: Tensor, member: Tensor, out: Tensor | None, update: bool = True) -> Tensor:
        """exp(T * hinge - shift) on the members, 0 elsewhere (into ``out`` when given); with ``update`` the
        running shift moves and the sums are rescaled."""
        if self.T == 0:
            return member
        a, b = self.sign * self.T, self.offset * self.T
        if self.fixed is not None:
            z = torch.mul(d, a, out=out)
            if b != self.fixed:
                z.add_(b - self.fixed)
            return z.exp_().mul_(member)
        z = torch.mul(d, a, out=out).add_(b).add_(torch.log(member))  # -inf off the set
        if update:
            new = torch.maximum(self.shift, z.amax(1))
            new = torch.where(new == -math.inf, torch.zeros_like(new), new)  # no member yet: any finite shift
            scale = torch.exp(self.shift - new)
            self.S.mul_(scale)
            self.H.mul_(scale)
            if self.G is not None:
                self.G.mul_(scale[:, None])
            self.shift = new
        return z.sub_(self.shift[:, None]).exp_()

    def add(self, e: Tensor, d: Tensor, scratch: Tensor | None) -> Tensor:
        """Add a tile's weights to S and H (sum e * hinge = sign * sum e * d + offset * sum e); returns sum e."""
        s = e.sum(1)
        self.S.add_(s)
        self.H.add_(torch.mul(e, d, out=scratch).sum(1).mul_(self.sign).add_(s, alpha=self.offset))
        return s.sum()

    def normaliser(self) -> Tensor:
        return torch.where(self.S == 0, torch.ones_like(self.S), self.S)

    def loss(self) -> Tensor:
        """The weighted mean hinge of the set (eqs. 3, 4); 0 for an empty set."""
        return self.H / self.normaliser()


def _pair_gradient(
    k: Tensor, tile: _Tile, q: Tensor, g: Tensor, sync_free: bool, members: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """sum_j k_ij / d_ij (q_i - g_j) for a tile: the Gram form, the near-duplicates from explicit differences.

    ``k`` (d loss / d d per pair) is turned in place into c = k / d with the near-duplicates zeroed (returned, for
    the gallery side); a pair within rounding of distance 0 has direction 0. ``members``: the number of pairs
    with a coefficient, when known; on a CPU a tile with few (e.g. the positives among a large reference set) is
    then listed instead of multiplied densely.
    """
    near, d = tile.near, tile.d
    k_near = k[near.rows, near.cols]
    d_near = d[near.rows, near.cols]
    tiny = d_near <= ZERO_DISTANCE_EPS * torch.finfo(d.dtype).eps
    c_near = torch.where(near.keep & ~tiny, k_near / torch.where(tiny, torch.ones_like(d_near), d_near), 0.0)
    if sync_free:  # beyond the fixed number of near-duplicates a distance can be 0: direction 0
        c = k.mul_(torch.where(d > ZERO_DISTANCE_EPS * torch.finfo(d.dtype).eps, d.reciprocal(), 0.0))
    else:  # every pair not listed as near lies at least 1e-2 away
        c = k.div_(d)
        if tile.diag is not None:
            c.diagonal(tile.diag).fill_(0.0)
    c.index_put_((near.rows, near.cols), torch.where(near.keep, 0.0, c[near.rows, near.cols]))
    count = None if sync_free or members is None else int(members)
    if count is None or count > _SPARSE_PRODUCT * c.numel():
        out = torch.addmm(q * c.sum(1)[:, None], c, g, alpha=-1)
    elif count == 0:
        out = torch.zeros_like(q)
    else:
        rows, cols = torch.nonzero(c, as_tuple=True)
        values = c[rows, cols]
        out = (q * c.sum(1)[:, None]).index_add_(0, rows, values[:, None] * g[cols], alpha=-1)
    return out.index_add_(0, near.rows, c_near[:, None] * near.diff), c_near


def _tiling(B: int, R: int, x: Tensor) -> tuple[int, int]:
    """(queries, gallery items) per tile."""
    elements = _TILE_ELEMENTS_CUDA if x.is_cuda else _TILE_ELEMENTS_CPU
    rows = min(B, max(_MIN_TILE_ROWS, elements // max(R, 1)))
    return rows, min(R, max(1, elements // rows))


def _set_states(b: int, like: Tensor, params: RankedListParams, dim: int | None) -> tuple[_SetState, _SetState]:
    low, alpha = params.positive_boundary, params.negative_boundary
    p = _SetState(b, like, params.Tp, 1.0, -low, fixed_shift(params.Tp, None, like.dtype), dim=dim)
    n = _SetState(b, like, params.Tn, -1.0, alpha, fixed_shift(params.Tn, alpha, like.dtype), dim=dim)
    return p, n


def _forward_block(
    q: Tensor, q_sq: Tensor, rows: slice, pb: _Problem, chunk: int, paper_grad: bool, *, gram: _SymmetricGram | None
) -> tuple[Tensor, Tensor | None, _SetState, _SetState, Tensor, Tensor]:
    """One block of queries against the whole gallery, chunk by chunk.

    Returns (losses, paper gradient or None, P* and N* states, counts of P* and N*).
    """
    b, R = q.shape[0], pb.gallery.shape[0]
    params, sync_free = pb.params, pb.sync_free
    lam = params.imbalance
    single = chunk >= R
    ws = Workspace(b * min(chunk, R), q)
    p, n = _set_states(b, q, params, None if single or not paper_grad else q.shape[1])
    count_p = torch.zeros((), dtype=q.dtype, device=q.device)
    count_n = torch.zeros((), dtype=q.dtype, device=q.device)
    grad: Tensor | None = None
    for start in range(0, R, chunk):
        cols = slice(start, min(R, start + chunk))
        g_c = pb.gallery[cols]
        c = g_c.shape[0]
        tile = _tile(q, q_sq, rows, cols, pb, ws, gram=gram)
        e_p = p.weights(tile.d, tile.member_p, ws.get("e_p", b, c))
        e_n = n.weights(tile.d, tile.member_n, ws.get("e_n", b, c))
        sum_p = p.add(e_p, tile.d, ws.get("k", b, c))
        sum_n = n.add(e_n, tile.d, ws.get("k", b, c))
        # with T = 0 the weights are the members: their sum is the count
        tile_p = sum_p if params.Tp == 0 else tile.member_p.sum()
        tile_n = sum_n if params.Tn == 0 else tile.member_n.sum()
        count_p, count_n = count_p + tile_p, count_n + tile_n
        if not paper_grad:
            continue
        if single:  # one chunk: the normalisers are final, one product for both sets
            k = torch.mul(e_p, ((1 - lam) / p.normaliser())[:, None], out=ws.get("k", b, c))
            k.addcmul_(e_n, (-lam / n.normaliser())[:, None])
            grad = _pair_gradient(k, tile, q, g_c, sync_free)[0]
        else:
            for state, e, m in ((p, e_p, tile_p), (n, e_n, tile_n)):
                assert state.G is not None
                state.G.add_(_pair_gradient(e, tile, q, g_c, sync_free, m)[0])  # e is not needed afterwards
    if paper_grad and grad is None:
        assert p.G is not None and n.G is not None
        grad = p.G * ((1 - lam) / p.normaliser())[:, None] - n.G * (lam / n.normaliser())[:, None]
    losses = (1 - lam) * p.loss() + lam * n.loss()
    return losses, grad, p, n, count_p, count_n


class _RankedListDense(torch.autograd.Function):
    """Forward: per-query losses, tile by tile. Backward: the paper's gradient (computed in the forward pass) or
    the autograd rule's (tiles recomputed)."""

    @staticmethod
    def forward(  # noqa: PLR0917 (Function.apply passes its arguments by position)
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
        sync_free = query.is_meta or sync_free_wanted(query)  # a meta tensor has no values to read
        q_sq_all = squared_norms(query)
        pb = _Problem(gallery, q_sq_all if same else squared_norms(gallery), masks, params, same, sync_free)
        gram = _SymmetricGram(query, q_sq_all) if _SYMMETRIC and same and chunk >= R and not sync_free else None
        losses, grads, stats = [], [], []
        count_p = torch.zeros((), dtype=query.dtype, device=query.device)
        count_n = torch.zeros((), dtype=query.dtype, device=query.device)
        for start in range(0, B, step):
            rows = slice(start, min(B, start + step))
            paper_grad = need_grad and paper
            out, grad, p, n, c_p, c_n = _forward_block(
                query[rows], q_sq_all[rows], rows, pb, chunk, paper_grad, gram=gram
            )
            losses.append(out)
            count_p, count_n = count_p + c_p, count_n + c_n
            if grad is not None:
                grads.append(grad)
            elif need_grad:
                stats.append(torch.stack([p.shift, p.S, p.loss(), n.shift, n.S, n.loss()]))
        ctx.paper, ctx.tiling = paper, (step, chunk)
        ctx.settings = (masks, params, same, sync_free)  # the tensors travel through save_for_backward
        if need_grad and paper:
            ctx.save_for_backward(torch.cat(grads))
        elif need_grad:
            ctx.save_for_backward(query, gallery, torch.cat(stats, 1))
        count_p, count_n = count_p.long(), count_n.long()
        ctx.mark_non_differentiable(count_p, count_n)
        return torch.cat(losses), count_p, count_n

    @staticmethod
    @closed_form_backward("the Ranked List Loss (dense path)")
    def backward(ctx: Any, grad_losses: Tensor, _gp: Tensor | None, _gn: Tensor | None) -> tuple[Tensor | None, ...]:
        if ctx.paper:
            (grad,) = ctx.saved_tensors
            return grad * grad_losses[:, None], None, None, None, None, None
        query, gallery, stats = ctx.saved_tensors
        pb = _Problem(gallery, squared_norms(gallery), *ctx.settings)
        grad_q, grad_g = _autograd_backward(query, stats, grad_losses, pb, ctx.tiling, ctx.needs_input_grad[1])
        return grad_q, grad_g, None, None, None, None


def _autograd_backward(
    query: Tensor, stats: Tensor, grad_losses: Tensor, pb: _Problem, tiling: tuple[int, int], ref_needs_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """The exact derivative of the losses: tiles recomputed, weights differentiated, both ends of every pair moved.

    d loss_i / d hinge_ij = w_ij (1 + T (hinge_ij - L_set,i)) per set, times (1 - lambda) or lambda.
    """
    gallery, params, same = pb.gallery, pb.params, pb.same
    B, R = query.shape[0], gallery.shape[0]
    step, chunk = tiling
    lam = params.imbalance
    q_sq_all = squared_norms(query)
    grad_q = torch.zeros_like(query)
    grad_g = torch.zeros_like(gallery) if same or ref_needs_grad else None
    shift_p, S_p, L_p, shift_n, S_n, L_n = stats
    for start in range(0, B, step):
        rows = slice(start, min(B, start + step))
        q, q_sq, gl = query[rows], q_sq_all[rows], grad_losses[rows]
        p, n = _set_states(q.shape[0], q, params, None)
        p.shift, n.shift = shift_p[rows], shift_n[rows]
        ws = Workspace(q.shape[0] * min(chunk, R), q)
        coefs = (
            (p, L_p[rows], gl * (1 - lam) / torch.where(S_p[rows] == 0, 1.0, S_p[rows])),
            (n, L_n[rows], gl * lam / torch.where(S_n[rows] == 0, 1.0, S_n[rows])),
        )
        for c_start in range(0, R, chunk):
            cols = slice(c_start, min(R, c_start + chunk))
            g_c = gallery[cols]
            tile = _tile(q, q_sq, rows, cols, pb, ws, gram=None)
            k = torch.zeros_like(tile.d)
            for (state, L, a), member in zip(coefs, (tile.member_p, tile.member_n)):
                e = state.weights(tile.d, member, None, update=False)
                if state.T != 0:  # d w / d hinge: the factor 1 + T (hinge - L_set)
                    hinge = torch.mul(tile.d, state.sign).add_(state.offset)
                    e = e * hinge.sub_(L[:, None]).mul_(state.T).add_(1.0)
                k.add_(e * (state.sign * a)[:, None])
            grad_tile, c_near = _pair_gradient(k, tile, q, g_c, pb.sync_free)  # k is now c, near-duplicates zeroed
            grad_q[rows] += grad_tile
            if grad_g is not None:
                c = k
                target = grad_q if same else grad_g
                target[cols] += c.sum(0)[:, None] * g_c - c.T @ q
                pair = c_near[:, None] * tile.near.diff
                target[cols] -= torch.zeros_like(g_c).index_add_(0, tile.near.cols, pair)
    return grad_q, None if same else grad_g


def ranked_list_dense(
    query: Tensor, ref: Tensor | None, masks: MaskFn, *, params: RankedListParams, paper: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-query Ranked List Loss on Euclidean distances, dense and synchronisation-free.

    Same contract as :func:`.ranked_list_euclidean.ranked_list_euclidean`: ``ref=None`` means the gallery is the
    query batch; returns (losses (B,), number of non-trivial positives, of negatives), the counts as 0-d tensors.
    On a CPU outside ``torch.compile`` it may read values on the host (which costs nothing there).
    """
    need_grad = torch.is_grad_enabled() and (query.requires_grad or (ref is not None and ref.requires_grad))
    out: tuple[Tensor, Tensor, Tensor] = _RankedListDense.apply(query, ref, masks, params, paper, need_grad)
    return out
