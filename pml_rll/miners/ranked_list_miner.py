"""RankedListMiner: the non-trivial pairs of the Ranked List Loss as a PML miner (docs/ranked_list_loss.md, 2.4)."""

from __future__ import annotations

import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.miners import BaseMiner
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from ..functional.numerics import euclidean_distances
from ..functional.ranked_list import non_trivial_pairs
from ..functional.ranked_list_params import RankedListParams, default_alpha
from ..utils.distances import is_fast_distance
from ..utils.validation import (
    MAX_MAGNITUDE,
    HyperParameterError,
    check_batch,
    check_distance,
    check_not_meta,
    check_number,
)


class RankedListMiner(BaseMiner):
    """Mines the non-trivial pairs of the Ranked List Loss (Ranked List Loss, CVPR 2019, section 3.2).

    For every query, the positives farther than ``alpha - margin`` (the query itself excluded) and the negatives
    closer than ``alpha``, both strict, returned as a PML pair tuple ``(a1, p, a2, n)``. Usable with any pair loss;
    ``RankedListLoss`` on the mined pairs equals ``RankedListLoss`` on all pairs.

    Args:
        margin: m, the gap between the two boundaries, in [0, 1e30].
        alpha: the negative boundary in (0, 1e30]; ``None`` means the default of ``RankedListLoss``
            (:func:`~pml_rll.functional.ranked_list_params.default_alpha`).
        **kwargs: PML's ``distance`` (default ``LpDistance(p=2, normalize_embeddings=True)``, computed exactly as
            the loss computes it), ``collect_stats``.

    Half-precision embeddings are compared in float32 (as the loss computes them), any distance; a ``ref_emb`` of
    another floating dtype is cast to the embeddings' dtype first.

    Bad input: embeddings and ``ref_emb`` must be 2-D floating-point tensors of one width with finite values (a NaN
    row raises a ``ValueError`` instead of being silently dropped), not on the meta device (the number of pairs
    depends on the values), labels (and ``ref_labels`` with ``ref_emb``) 1-D integer tensors of matching length; see
    :mod:`pml_rll.utils.validation`. An out-of-range ``margin``, ``alpha`` or a similarity as ``distance`` raises
    :class:`~pml_rll.utils.validation.HyperParameterError`, both a ``ValueError`` and an ``AssertionError``.

    Recorded: margin, alpha; statistics num_pos_pairs, num_neg_pairs (PML's), ``avg_num_pos_per_query`` and
    ``avg_num_neg_per_query``.
    """

    def __init__(self, margin: float = 0.4, alpha: float | None = None, **kwargs):
        super().__init__(**kwargs)
        self.margin = check_number("margin", margin, 0.0, MAX_MAGNITUDE)
        self.alpha = default_alpha(self.margin) if alpha is None else check_number("alpha", alpha, high=MAX_MAGNITUDE)
        if self.alpha <= 0:
            raise HyperParameterError(f"alpha must be positive, got {self.alpha}")
        check_distance(self.distance, "RankedListMiner")
        self.add_to_recordable_attributes(list_of_names=["margin", "alpha"], is_stat=False)
        self.add_to_recordable_attributes(
            list_of_names=["avg_num_pos_per_query", "avg_num_neg_per_query"], is_stat=True
        )

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        """Mine the non-trivial pairs of each query: ``(a1, p, a2, n)`` as PML's pair miners return them.

        Args:
            embeddings: (N, D) float tensor.
            labels: (N,) integer labels (required).
            ref_emb: optional (M, D) gallery; the batch itself by default.
            ref_labels: (M,) labels of ``ref_emb``.
        """
        # every argument checked before PML's forward resets the statistics: a rejected call changes nothing
        check_batch(embeddings, labels, ref_emb, ref_labels, labels_required=True)
        check_not_meta("embeddings", embeddings, "RankedListMiner", "the number of mined pairs depends on them")
        return super().forward(embeddings, labels, ref_emb, ref_labels)

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        """PML's hook: the non-trivial positive and negative pairs (arguments already checked by :meth:`forward`)."""
        check_distance(self.distance, "RankedListMiner")  # labels and ref_labels were required in forward
        ref_emb = ref_emb.to(embeddings.dtype)  # a reference set of another dtype is cast, as in RankedListLoss
        with torch.autocast(embeddings.device.type, enabled=False):
            d = self._distances(embeddings, ref_emb)
        matches, diffs = lmu.get_matches_and_diffs(labels, ref_labels)
        a1, p, a2, n = non_trivial_pairs(
            d, matches.bool(), diffs.bool(), params=RankedListParams(margin=self.margin, alpha=self.alpha)
        )
        if self.collect_stats:
            self.avg_num_pos_per_query = len(a1) / len(embeddings)
            self.avg_num_neg_per_query = len(a2) / len(embeddings)
        return a1, p, a2, n

    def _distances(self, embeddings, ref_emb):
        dist = self.distance
        same = ref_emb is embeddings
        if embeddings.dtype in (torch.float16, torch.bfloat16):  # half precision computed in float32, as in the loss
            embeddings = embeddings.float()
            ref_emb = embeddings if same else ref_emb.float()
        if is_fast_distance(dist):

            def prepare(x):
                return torch.nn.functional.normalize(x, dim=1) if dist.normalize_embeddings else x

            query = prepare(embeddings)
            gallery = query if same else prepare(ref_emb)
            return euclidean_distances(query, gallery)
        return dist(embeddings, ref_emb)

    def get_default_distance(self):
        """``LpDistance(p=2, power=1, normalize_embeddings=True)``, as :class:`pml_rll.losses.RankedListLoss`."""
        return LpDistance(p=2, power=1, normalize_embeddings=True)
