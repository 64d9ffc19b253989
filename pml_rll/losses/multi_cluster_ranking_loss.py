"""MultiClusterRankingLoss: the self-supervised structure term of NAMR."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.reducers import MeanReducer

from ..functional import namr as F_namr
from ..utils.validation import (
    MAX_TEMPERATURE,
    check_batch,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_numbers,
    check_structure_positive,
)


class MultiClusterRankingLoss(BaseMetricLossFunction):
    """Self-supervised multi-cluster ranking loss on packed ``[x || s]`` embeddings.

    Paper: "Neighborhood-Adaptive Multi-cluster Ranking for Deep Metric Learning" (NAMR, TCSVT 2022),
    whose loss is not published; this is the documented NASA (AAAI 2022) "group-wise ranking" loss,
    generalised to M ordered clusters (docs/namr.md, sections 4.2-4.5).

    For a batch of sample embeddings x (N x d) and structure embeddings s (N x d):

    * mu, sigma: mean and Bessel-corrected std of all N*N plain Euclidean distances of x (diagonal zeros
      included by default), detached;
    * centres eta_m = max(floor * mu, mu - t_m * sigma), one per ``t_values`` entry, deduplicated;
    * anchor-adaptive distance D_ij = sqrt(sum_k s_ik (x_ik - x_jk)^2) (the anchor's s_i);
    * loss = mean over ordered pairs i != j of sum_m softmax_m(-alpha |D_ij - eta_m|) |D_ij - eta_m|.

    With ``t_values=(0, 3)``, ``alpha=10``, ``floor=0.2`` this is exactly the NASA code's loss. Labels are
    optional and ignored unless ``shortlist_weight > 0``. x is used exactly as given: scaling by the mean distance
    is done by :class:`~pml_rll.losses.NAMRLoss`, not here.

    Faithful: the formulas above, gradient to both x and s, soft assignment not detached, only mu and
    sigma detached. Choices: the per-dimension ``1e-12`` clamp of NASA is applied to the sum (at most
    ``1e-12 * sum_k s_ik`` of difference inside the square root; see :mod:`pml_rll.functional.namr`) to
    keep memory O(N*N); duplicate centres after the floor are dropped (recorded in ``num_centres``);
    the loss is returned per anchor (``reduction_type="element"``) and the default ``MeanReducer`` turns
    it into the NASA global mean.

    Args:
        embedding_size: d, the width of x and of s; inputs must have width ``2 * d``.
        t_values: one t_m per cluster (M = len(t_values) >= 1), distinct numbers in [-1e4, 1e4] (a string is
            rejected, not read as digits). (0, 3) is NASA.
        alpha: soft-assignment sharpness in (0, 1e4] (``MAX_TEMPERATURE``: keeps alpha * |D - eta| finite in
            float32). NASA: 10.
        floor: lower bound of every centre as a fraction of mu, in [0, 1e4]. NASA: 0.2.
        stats_include_diagonal: take mu and sigma over all N*N distances (NASA) or off-diagonal only
            (``center_mode="batch"`` only).
        detach_sample_embedding: stop the gradient of this loss into x, so that only s (and, through s, the
            trunk) learns from it and the base loss alone shapes x's geometry. A choice offered for ablation;
            NASA: False (joint gradient).
        center_mode: ``"batch"`` (NASA): one set of centres from the statistics of all the batch's distances.
            ``"per_anchor"`` (a reconstruction of NAMR's "neighbourhood-adaptive" centres, not documented
            anywhere): anchor i's centres ``max(floor * mu_i, mu_i - t_m * sigma_i)`` from the mean and std of its
            own row of distances, or of its ``neighbourhood_k`` nearest; centres that coincide within a row are
            given weight 0.
        neighbourhood_k: ``center_mode="per_anchor"`` only: take mu_i, sigma_i over the anchor's k nearest
            batch items (int >= 2) instead of its whole row (None, default).
        centre_structure: divide s by its batch mean per dimension before the loss sees it (not detached;
            :func:`pml_rll.functional.namr.centre_structure`), so the loss is blind to one global re-weighting of
            the dimensions and only each sample's deviation from the batch's s is trained. Retrieve with
            ``NAMRReRankKNN(centre_structure=True)``. A remedy for the collapse of s to one vector
            (docs/namr.md, section 9); NASA: False.
        shortlist_weight: weight gamma >= 0 of a supervised short-list ranking term added per anchor
            (:func:`pml_rll.functional.namr.shortlist_ranking_losses`): each anchor's ``shortlist_k`` nearest
            batch items by plain distance on x are ranked by the s-weighted distance, and every same-class item
            ranked behind an other-class one is penalised (softplus with ``shortlist_temperature``). x is
            detached there: the term trains s for re-ranking. Needs labels. 0 (default, NASA): off.
        shortlist_k: size of each anchor's short list (int >= 2; default 8).
        shortlist_temperature: softplus temperature, relative to the anchor's mean plain squared distance to its
            short list, in (0, 1e4] (default 0.1).
        **kwargs: passed to ``BaseMetricLossFunction`` (reducer, collect_stats, ...). A distance object is
            not used: the loss has its own fixed distances.

    Bad input (see :mod:`pml_rll.utils.validation`): every call is checked before anything is computed or
    recorded: embeddings (N, 2d) floating point, finite, N >= 2, s > 0; labels, when given, a 1-D integer tensor
    of length N; ``indices_tuple`` and ``ref_emb`` are rejected.
    """

    def __init__(
        self,
        embedding_size: int,
        t_values: Sequence[float] = (0.0, 3.0),
        alpha: float = 10.0,
        floor: float = 0.2,
        stats_include_diagonal: bool = True,
        detach_sample_embedding: bool = False,
        center_mode: str = "batch",
        neighbourhood_k: int | None = None,
        centre_structure: bool = False,
        shortlist_weight: float = 0.0,
        shortlist_k: int = 8,
        shortlist_temperature: float = 0.1,
        **kwargs,
    ):
        embedding_size = check_int("embedding_size", embedding_size)
        t_list = check_numbers("t_values", t_values, low=-MAX_TEMPERATURE, high=MAX_TEMPERATURE)
        if len(set(t_list)) != len(t_list):
            raise ValueError(f"t_values must be distinct (a repeated t doubles a tier), got {t_values!r}")
        alpha = check_number("alpha", alpha, 0.0, MAX_TEMPERATURE, low_open=True)
        floor = check_number("floor", floor, 0.0, MAX_TEMPERATURE)
        stats_include_diagonal = check_bool("stats_include_diagonal", stats_include_diagonal)
        detach_sample_embedding = check_bool("detach_sample_embedding", detach_sample_embedding)
        check_choice("center_mode", center_mode, ("batch", "per_anchor"))
        if neighbourhood_k is not None:
            neighbourhood_k = check_int("neighbourhood_k", neighbourhood_k, low=2)
            if center_mode != "per_anchor":
                raise ValueError("neighbourhood_k needs center_mode='per_anchor'")
        centre_structure = check_bool("centre_structure", centre_structure)
        shortlist_weight = check_number("shortlist_weight", shortlist_weight, 0.0, MAX_TEMPERATURE)
        shortlist_k = check_int("shortlist_k", shortlist_k, low=2)
        shortlist_temperature = check_number(
            "shortlist_temperature", shortlist_temperature, 0.0, MAX_TEMPERATURE, low_open=True
        )
        super().__init__(**kwargs)
        self.centre_structure = bool(centre_structure)
        self.shortlist_weight = float(shortlist_weight)
        self.shortlist_k = int(shortlist_k)
        self.shortlist_temperature = float(shortlist_temperature)
        self.center_mode = center_mode
        self.neighbourhood_k = neighbourhood_k
        self.embedding_size = embedding_size
        self.t_values = tuple(sorted(t_list))
        self.alpha = float(alpha)
        self.floor = float(floor)
        self.stats_include_diagonal = bool(stats_include_diagonal)
        self.detach_sample_embedding = bool(detach_sample_embedding)
        self.add_to_recordable_attributes(
            list_of_names=["embedding_size", "alpha", "floor", "num_t_values", "shortlist_weight", "shortlist_k"],
            is_stat=False,
        )
        self.add_to_recordable_attributes(
            list_of_names=[
                "mean_distance",
                "std_distance",
                "num_centres",
                "mean_gap_to_nearest_centre",
                "nearest_cluster_fraction",
                "shortlist_loss",
            ],
            is_stat=True,
        )

    @property
    def num_t_values(self) -> int:
        """The number of cluster centres M (the length of ``t_values``)."""
        return len(self.t_values)

    def get_default_reducer(self):
        """PML's ``MeanReducer``: the mean over all ordered pairs."""
        return MeanReducer()

    def check_input(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None) -> None:
        """Raise on bad input to :meth:`forward` (nothing is computed or recorded)."""
        if indices_tuple is not None:
            raise ValueError(
                "indices_tuple: MultiClusterRankingLoss is self-supervised over all ordered pairs; it is not supported"
            )
        if ref_emb is not None or ref_labels is not None:
            raise ValueError("ref_emb: MultiClusterRankingLoss works on the batch itself; ref_emb is not supported")
        check_batch(embeddings, labels, packed=self.embedding_size)
        if self.shortlist_weight > 0 and labels is None:
            raise ValueError("labels: shortlist_weight > 0 ranks same-class above other-class items and needs labels")
        check_structure_positive("embeddings", embeddings, self.embedding_size)
        if embeddings.shape[0] < 2:
            raise ValueError(
                f"embeddings: MultiClusterRankingLoss needs a batch of at least 2 embeddings, got {embeddings.shape[0]}"
            )

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        """The structure loss of packed embeddings ``[x || s]`` (N, 2 * embedding_size); labels are not used.

        Computed in float32 or float64 whatever the autocast state; ``indices_tuple`` and ``ref_emb`` are rejected.
        """
        self.check_input(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        # computed in float32 or float64 whatever the autocast state (half precision is upcast)
        with torch.autocast(embeddings.device.type, enabled=False):
            return super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """PML's hook: the per-pair multi-cluster ranking losses of the batch (arguments already checked)."""
        # every argument was checked by check_input in forward (a second pass would synchronise twice)
        x, s = F_namr.split_packed(embeddings, self.embedding_size)
        if x.dtype in (torch.float16, torch.bfloat16):  # pairwise sums in float32, as RankedListLoss does
            x, s = x.float(), s.float()
        if self.detach_sample_embedding:
            x = x.detach()
        if self.centre_structure:
            s = F_namr.centre_structure(s)
        anchor_losses, dist, centres = F_namr.multi_cluster_anchor_losses(
            x,
            s,
            self.t_values,
            self.alpha,
            self.floor,
            self.stats_include_diagonal,
            self.center_mode,
            self.neighbourhood_k,
        )
        if self.shortlist_weight > 0:
            shortlist, _ = F_namr.shortlist_ranking_losses(x, s, labels, self.shortlist_k, self.shortlist_temperature)
            anchor_losses = anchor_losses + self.shortlist_weight * shortlist
            if self.collect_stats:
                self.shortlist_loss = shortlist.detach().mean().item()
        if self.collect_stats:
            with torch.no_grad():
                mu, sigma = F_namr.distance_statistics(x, self.stats_include_diagonal)
                n = x.shape[0]
                off = ~torch.eye(n, dtype=torch.bool, device=x.device)
                gaps = F_namr.centre_gaps(dist, centres)[off]
                nearest = gaps.argmin(-1)
                self.mean_distance = mu.item()
                self.std_distance = sigma.item()
                self.num_centres = int(centres.shape[-1])
                self.mean_gap_to_nearest_centre = gaps.min(-1).values.mean().item()
                # share of ordered pairs whose nearest centre is the lowest one (the "neighbour" tier)
                self.nearest_cluster_fraction = (nearest == centres.shape[-1] - 1).double().mean().item()
        return {
            "loss": {
                "losses": anchor_losses,
                "indices": torch.arange(x.shape[0], device=x.device),
                "reduction_type": "element",
            }
        }
