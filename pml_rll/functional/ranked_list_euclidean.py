"""The Ranked List Loss on Euclidean distances: the entry point, which chooses one of three paths once per call.

The three paths give the same values and gradients and differ in cost. The list path (:mod:`.ranked_list_list`)
lists the non-trivial pairs, sized on the host; the dense path (:mod:`.ranked_list_dense`) computes every pair in
tiles without any synchronisation; the split path (:mod:`.ranked_list_split`) lists the positives from the labels
and computes the negatives in lean panels. :func:`choose_path` decides which one computes a call, from the device,
the sizes, the kind of candidate pairs and, on a CPU, a sample of queries; :func:`ranked_list_euclidean` runs it.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from .numerics import squared_euclidean
from .ranked_list import LabelMasks, MaskFn
from .ranked_list_dense import ranked_list_dense, sync_free_wanted
from .ranked_list_list import ranked_list_list
from .ranked_list_params import RankedListParams
from .ranked_list_split import SamePairs, ranked_list_split, sparse_positives, split_supported

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
    query: Tensor,
    ref: Tensor | None,
    masks: MaskFn,
    *,
    params: RankedListParams,
    paper: bool,
    split_applies: Callable[[], bool],
) -> str:
    """CPU: the path ``"auto"`` takes; ``split_applies()``: whether the split path applies, asked only where it
    would be taken (it sorts the labels).

    The split path for a large batch or reference set, and for long lists from a medium batch on; below that, long
    lists take the dense path with the paper's rule and the list path with the autograd rule (whose dense second
    pass costs more than the lists); short lists take the list path. Measured on 2 CPU threads
    (``python -m benchmarks.loss_speed --inputs hard`` and ``--inputs random``).
    """
    B, R = query.shape[0], query.shape[0] if ref is None else ref.shape[0]
    large = R >= _LARGE_GALLERY
    if (large or B * R >= _SPLIT_PAIRS) and split_applies():
        return "split"
    if large:
        return "dense"
    if not dense_lists_expected(query, ref, masks, params=params):
        return "list"
    if B * R >= _SPLIT_PAIRS_LONG and split_applies():
        return "split"
    return "dense" if paper or B * R >= _LIST_AUTOGRAD_PAIRS else "list"


def choose_path(
    query: Tensor, ref: Tensor | None, masks: MaskFn, *, params: RankedListParams, paper: bool, path: str = "auto"
) -> tuple[str, SamePairs | None]:
    """The path that computes a call of :func:`ranked_list_euclidean` (``"list"``, ``"dense"`` or ``"split"``),
    decided once, and for the split path its same-label pairs (:func:`.sparse_positives`; None for the others).

    ``path="split"`` is taken where the split path applies (:func:`.split_supported` and sparse positives), the
    dense path otherwise; ``"auto"``: see :func:`ranked_list_euclidean`.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if path == "auto" and sync_free_wanted(query):
        return "dense", None
    if path in ("list", "dense"):
        return path, None
    labels = masks if isinstance(masks, LabelMasks) and split_supported(query, masks, params=params) else None
    found: list[SamePairs | None] = []  # the same-label pairs, sorted at most once

    def split_applies() -> bool:
        if labels is None:
            return False
        if not found:
            found.append(sparse_positives(labels, query.shape[0], query.shape[0] if ref is None else ref.shape[0]))
        return found[0] is not None

    if path == "split":
        chosen = "split" if split_applies() else "dense"
    else:
        chosen = _auto_path(query, ref, masks, params=params, paper=paper, split_applies=split_applies)
    return chosen, found[0] if chosen == "split" else None


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

    ``path``: ``"list"`` lists the non-trivial pairs (:mod:`.ranked_list_list`; fastest on a CPU when they are
    few; the list sizes are decided on the host), ``"dense"`` computes every pair in tiles without any
    synchronisation (:mod:`.ranked_list_dense`), ``"split"`` lists the positives from the labels and computes the
    negatives in lean blocks (:mod:`.ranked_list_split`; a CPU form for long lists and large reference sets, with
    labels and both gradient rules; where it does not apply the dense path is taken). ``"auto"`` takes the dense
    path on CUDA and under ``torch.compile``; on a CPU the split path for a large batch (``_SPLIT_PAIRS`` pairs), a
    large reference set or long lists (a sample of queries shows them) from a medium batch on, where it applies;
    otherwise the dense path for a large reference set or long lists (the list path for long lists of a small
    batch with the autograd rule), the list path for short lists. All give the same values and gradients.
    """
    path, positives = choose_path(query, ref, masks, params=params, paper=paper, path=path)
    if path == "split":
        assert isinstance(masks, LabelMasks) and positives is not None  # choose_path found them sparse
        split = ranked_list_split(
            query, ref, masks, params=params, paper=paper, count_negatives=count_negatives, positives=positives
        )
        assert split is not None  # it declines only where the positives are not sparse
        return split
    compute = ranked_list_dense if path == "dense" else ranked_list_list
    losses, n_pos, n_neg = compute(query, ref, masks, params=params, paper=paper)
    return losses, n_pos, n_neg if count_negatives else None
