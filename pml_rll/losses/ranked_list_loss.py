"""RankedListLoss: the Ranked List Loss (CVPR 2019, eqs. 2-5) as a PML loss; see docs/ranked_list_loss.md."""

from __future__ import annotations

import contextlib
import math

import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.utils import common_functions as c_f
from torch import Tensor

from ..functional.normalize import l2_normalize
from ..functional.ranked_list import (
    MaskFn,
    dense_masks,
    label_masks,
    negative_hinge,
    non_trivial_pairs,
    positive_hinge,
    ranked_lists,
)
from ..functional.ranked_list_dense import sync_free_wanted
from ..functional.ranked_list_euclidean import PATHS, ranked_list_euclidean
from ..functional.ranked_list_params import GRADIENT_MODES, RankedListParams, default_alpha
from ..utils.distances import is_fast_distance
from ..utils.validation import (
    MAX_MAGNITUDE,
    HyperParameterError,
    check_batch,
    check_choice,
    check_distance,
    check_keywords,
    check_not_meta,
    check_number,
    check_temperature,
    pairs_to_masks,
)


def _autocast_disabled(like: Tensor) -> contextlib.AbstractContextManager:
    """A context that turns autocast off on ``like``'s device type (nothing on the meta device, which has none)."""
    if like.is_meta:
        return contextlib.nullcontext()
    return torch.autocast(like.device.type, enabled=False)


class RankedListLoss(BaseMetricLossFunction):
    r"""Ranked List Loss, exactly as in the paper.

    "Ranked List Loss for Deep Metric Learning", CVPR 2019 (eqs. 2-5); TPAMI 2021.
    A drop-in replacement for ``pytorch_metric_learning.losses.RankedListLoss``: same argument names and meaning.

    Every sample is a query; the rest of the batch (or ``ref_emb``) is its gallery. On L2-normalised embeddings
    with Euclidean distance d, the non-trivial positives are the same-class items with d > alpha - margin (the
    query itself excluded) and the non-trivial negatives the other-class items with d < alpha, both strict.
    Per query: ``(1 - imbalance) * L_P + imbalance * L_N`` where L_P is the weighted mean of d - (alpha - margin)
    over the positives (weights exp(Tp * .), a plain mean at Tp = 0) and L_N the weighted mean of alpha - d over the
    negatives (weights exp(Tn * (alpha - d))). The batch loss is the mean over all queries (the reducer), an empty
    set contributing 0.

    Args:
        margin: m, the gap between the positive boundary alpha - m and the negative boundary alpha, in [0, 1e30].
        Tn: temperature of the negative weighting (0: uniform; large: the hardest negative only), in
            [0, 1e4] (``pml_rll.utils.validation.MAX_TEMPERATURE``: beyond it float32 changes nothing but can
            overflow).
        imbalance: lambda in ``(1 - lambda) * L_P + lambda * L_N``, in [0, 1]. The CVPR form ``L_P + l * L_N``
            is this with imbalance = l / (1 + l), times (1 + l).
        alpha: the negative boundary in (0, 1e30]; ``None`` means
            :func:`~pml_rll.functional.ranked_list_params.default_alpha` of the margin (the TPAMI code's fixed
            boundaries: alpha = 1.2 at the default margin).
        Tp: temperature of the positive weighting (0 in the paper's experiments), in [0, 1e4] like Tn.
        gradient: ``"paper"`` (default): the weights are constants and each pair's gradient reaches only its query,
            the gallery held fixed, as the authors state; every non-trivial negative is pushed away and every
            non-trivial positive pulled in. ``"autograd"``: the plain derivative of the loss value (what PML's
            class computes), which also differentiates the weights and moves the gallery end of each pair; with
            Tn > 0 it can pull a moderately hard negative towards its query. Either rule's backward pass is a
            closed form: differentiable once (``create_graph=True`` through the loss raises a RuntimeError).
        path: how the Euclidean fast path computes (same values and gradients): ``"list"`` lists the non-trivial
            pairs (host-side sizes), ``"dense"`` computes all pairs in tiles without synchronising the device,
            ``"split"`` (CPU, labels; the dense path elsewhere) lists the positives from the labels and computes
            the negatives in lean symmetric panels, ``"auto"`` (default) takes the dense path on CUDA
            and under ``torch.compile``, and on a CPU the split path for large batches and reference sets, the
            dense or list path otherwise (docs/ranked_list_loss.md, section 3.6). On CUDA and under
            ``torch.compile`` the embeddings are not checked for NaN (that check would synchronise).
        **kwargs: PML's ``distance``, ``reducer``, ``embedding_regularizer``, ``collect_stats``...

    Faithful to the paper, unlike PML 2.9's class: pairs at distance 0 count (identical embeddings of different
    classes are the hardest negatives); no epsilon in the weight normalisation; weights are max-shifted, so every
    allowed temperature is finite in every dtype (float16/bfloat16 are computed in float32); miners (``indices_tuple``),
    ``ref_emb``/``ref_labels`` (cross-batch memory, ``DistributedLossWrapper(efficient=True)``) and pairs without
    labels (multi-label data) are supported.

    As PML's losses, the loss is returned in the embeddings' dtype (float16/bfloat16: the float32 result rounded
    once; only unnormalised float16 embeddings tens of thousands apart give a loss beyond float16's range, returned
    as inf), and so is the gradient; ``ref_emb`` of another floating dtype is cast to the embeddings' dtype. On the
    meta device (shapes without values) the default distance gives the loss's shape and dtype and its backward the
    gradient's, the statistics are NaN (unknown); another distance raises a ``ValueError`` there.

    Choices: with ``indices_tuple``, the given pairs are the candidate lists (their labels are not re-checked);
    when ``ref_emb`` is given, the query is excluded from its own positives only if ``ref_emb`` is the batch itself
    (as in PML), so pass an ``indices_tuple`` when the reference set contains the batch. The default distance
    ``LpDistance(p=2, power=1, normalize_embeddings=True)`` takes the fast path (one matmul forward, one backward);
    any other non-inverted PML distance is supported through a slower generic path.

    Bad input (see :mod:`pml_rll.utils.validation`): every argument is checked before anything is computed or
    recorded, and a rejected call raises a ``TypeError``/``ValueError`` naming the argument: embeddings and
    ``ref_emb`` 2-D floating point of one width and finite, labels 1-D integer tensors of the batch's length,
    ``ref_labels`` with ``ref_emb`` (unless pairs are given), labels or an ``indices_tuple``. An out-of-range
    hyper-parameter raises :class:`~pml_rll.utils.validation.HyperParameterError`, both a ``ValueError`` and an
    ``AssertionError`` (what PML's class raises for ``imbalance``), so either ``except`` clause catches it.

    Recorded for record-keeper: margin, alpha, Tp, Tn, imbalance; statistics ``avg_num_pos_per_query`` and
    ``avg_num_neg_per_query`` (non-trivial pairs per query, when ``collect_stats`` is on).
    """

    def __init__(  # noqa: PLR0917 (PML's positional order, then gradient and path)
        self,
        margin: float = 0.4,
        Tn: float = 10.0,
        imbalance: float = 0.5,
        alpha: float | None = None,
        Tp: float = 0.0,
        gradient: str = "paper",
        path: str = "auto",
        **kwargs,
    ):
        check_keywords(self, kwargs)  # a typo names this class and the closest keyword
        super().__init__(**kwargs)
        self.margin = check_number("margin", margin, 0.0, MAX_MAGNITUDE)
        self.Tn = check_temperature("Tn", Tn)
        self.Tp = check_temperature("Tp", Tp)
        self.imbalance = check_number("imbalance", imbalance, 0.0, 1.0)
        self.alpha = default_alpha(self.margin) if alpha is None else check_number("alpha", alpha, high=MAX_MAGNITUDE)
        if self.alpha <= 0:
            raise HyperParameterError(f"alpha must be positive (no distance is below {self.alpha}), got {self.alpha}")
        self.gradient = check_choice("gradient", gradient, GRADIENT_MODES)
        self.path = check_choice("path", path, PATHS)
        check_distance(self.distance, "RankedListLoss")
        self.add_to_recordable_attributes(list_of_names=["margin", "alpha", "Tp", "Tn", "imbalance"], is_stat=False)
        self.add_to_recordable_attributes(
            list_of_names=["avg_num_pos_per_query", "avg_num_neg_per_query"], is_stat=True
        )

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        """PML's call signature: ``loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)``.

        Args:
            embeddings: (N, D) float tensor (float16/bfloat16 are computed in float32; meta tensors give the
                result's shape and dtype).
            labels: (N,) integer labels, or ``None`` when ``indices_tuple`` gives the pairs.
            indices_tuple: optional mined pairs (a1, p, a2, n) or triplets (a, p, n): each query's lists are
                restricted to them.
            ref_emb: optional (M, D) gallery (a reference set, cross-batch memory), cast to the embeddings' dtype;
                the batch itself by default.
            ref_labels: (M,) labels of ``ref_emb``.

        Returns:
            The loss, a scalar tensor of the embeddings' dtype, reduced over the queries by the reducer. Every
            argument is checked before any state changes.
        """
        # every argument checked before PML's forward resets the statistics: a rejected call changes nothing
        need_ref_labels = labels is not None and indices_tuple is None
        check_batch(
            embeddings,
            labels,
            ref_emb,
            ref_labels,
            ref_labels_required=need_ref_labels,
            indices_tuple=indices_tuple,
            # the finiteness check reads values on the host: skipped where the loss must not synchronise
            check_values=not (torch.is_tensor(embeddings) and sync_free_wanted(embeddings)),
        )
        if labels is None and indices_tuple is None:
            raise ValueError("RankedListLoss needs labels or an indices_tuple (the positive and negative pairs)")
        if not is_fast_distance(self.distance):
            why = f"with distance={type(self.distance).__name__} the non-trivial pairs are listed from the values"
            check_not_meta("embeddings", embeddings, "RankedListLoss", why)
        # the loss runs in float32 or float64 whatever the autocast state (half precision is upcast) and is returned
        # in the embeddings' dtype, as PML's losses return it
        with _autocast_disabled(embeddings):
            loss = super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        return loss.to(embeddings.dtype) if torch.is_tensor(loss) else loss

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """PML's hook: the per-query losses as a PML loss dictionary (arguments already checked by :meth:`forward`)."""
        check_distance(self.distance, "RankedListLoss")  # the distance may have been replaced after construction
        same = ref_emb is embeddings  # every argument was checked in forward
        ref_emb = ref_emb.to(embeddings.dtype)  # as PML's CrossBatchMemory casts its memory (no copy if equal)
        B, R = embeddings.shape[0], ref_emb.shape[0]
        if B == 0 or R == 0:
            return self.zero_losses()
        if indices_tuple is not None:
            pos, neg = pairs_to_masks(indices_tuple, B, R, embeddings.device)  # checked in forward
            masks = dense_masks(pos, neg)
        else:  # forward required ref_labels with ref_emb (PML passes labels as ref_labels otherwise)
            masks = label_masks(labels, ref_labels.to(labels.device))

        params = RankedListParams(
            margin=self.margin, alpha=self.alpha, Tp=self.Tp, Tn=self.Tn, imbalance=self.imbalance
        )
        paper = self.gradient == "paper"
        if is_fast_distance(self.distance):
            losses, n_pos, n_neg = self._euclidean_losses(embeddings, ref_emb, same, masks, params=params, paper=paper)
        else:
            losses, n_pos, n_neg = self._generic_losses(embeddings, ref_emb, same, masks, params=params, paper=paper)
        if self.collect_stats:
            assert n_neg is not None  # counted whenever statistics are collected
            # on the meta device the counts have no values: the statistics are NaN (unknown), never a stale number
            meta = embeddings.is_meta
            self.avg_num_pos_per_query = math.nan if meta else float(n_pos) / B
            self.avg_num_neg_per_query = math.nan if meta else float(n_neg) / B
        return {
            "loss": {
                "losses": losses,
                "indices": c_f.torch_arange_from_size(embeddings),
                "reduction_type": "element",
            }
        }

    def _euclidean_losses(
        self, embeddings: Tensor, ref_emb: Tensor, same: bool, masks: MaskFn, *, params: RankedListParams, paper: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The fast path; the number of non-trivial negatives is counted only when statistics are collected."""

        def prepare(x: Tensor) -> Tensor:
            if x.dtype in (torch.float16, torch.bfloat16):
                x = x.float()  # accumulate half precision in float32
            if self.distance.normalize_embeddings:
                x = l2_normalize(x)  # F.normalize's values and gradient, fewer passes
            return x

        query = prepare(embeddings)
        gallery = None if same else prepare(ref_emb)
        # on the meta device there are no values to list pairs from: the dense path, which never reads any
        path = "dense" if query.is_meta else self.path
        return ranked_list_euclidean(
            query, gallery, masks, params=params, paper=paper, path=path, count_negatives=self.collect_stats
        )

    def _generic_losses(
        self, embeddings: Tensor, ref_emb: Tensor, same: bool, masks: MaskFn, *, params: RankedListParams, paper: bool
    ) -> tuple[Tensor, int, int]:
        """Any PML distance: the non-trivial pairs of the dense matrix, then autograd through the core.

        In paper mode the gallery is detached and the weights are constants.
        """
        alpha, margin = params.negative_boundary, params.margin
        if embeddings.dtype in (torch.float16, torch.bfloat16):
            embeddings = embeddings.float()
            ref_emb = ref_emb.float()
        mat = self.distance(embeddings, ref_emb.detach() if paper else ref_emb)
        pos, neg = masks(slice(None), slice(None))
        if neg is None:
            neg = ~pos
        if same:  # a query is never its own positive, labels or pairs alike (as in the fast path)
            pos = pos & ~torch.eye(*pos.shape, dtype=torch.bool, device=pos.device)
        pr, pc, nr, nc = non_trivial_pairs(mat.detach(), pos, neg, params=params)
        h_p = positive_hinge(mat[pr, pc], alpha, margin)
        h_n = negative_hinge(mat[nr, nc], alpha)
        r = ranked_lists(h_p, pr, h_n, nr, embeddings.shape[0], params=params, detach_weights=paper)
        return r.losses, len(pr), len(nr)

    def get_default_distance(self):
        """``LpDistance(p=2, power=1, normalize_embeddings=True)``: Euclidean distance on L2-normalised embeddings."""
        return LpDistance(p=2, power=1, normalize_embeddings=True)
