"""MultiClusterRankingLoss: the self-supervised structure term of NAMR."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.reducers import MeanReducer

from ..functional import namr as F_namr


class MultiClusterRankingLoss(BaseMetricLossFunction):
    """Self-supervised multi-cluster ranking loss on packed ``[x || s]`` embeddings.

    Paper: "Neighborhood-Adaptive Multi-cluster Ranking for Deep Metric Learning" (NAMR, TCSVT 2022),
    whose loss is not published; this is the documented NASA (AAAI 2022) "group-wise ranking" loss,
    generalised to M ordered clusters (spec §1.3 b and §3.2).

    For a batch of sample embeddings x (N x d) and structure embeddings s (N x d):

    * mu, sigma: mean and Bessel-corrected std of all N*N plain Euclidean distances of x (diagonal zeros
      included by default), detached;
    * centres eta_m = max(floor * mu, mu - t_m * sigma), one per ``t_values`` entry, deduplicated;
    * anchor-adaptive distance D_ij = sqrt(sum_k s_ik (x_ik - x_jk)^2) (the anchor's s_i);
    * loss = mean over ordered pairs i != j of sum_m softmax_m(-alpha |D_ij - eta_m|) |D_ij - eta_m|.

    With ``t_values=(0, 3)``, ``alpha=10``, ``floor=0.2`` this is exactly the NASA code's loss. Labels are
    optional and ignored. x is used exactly as given: scaling by the mean distance is done by
    :class:`~pml_rll.losses.NAMRLoss`, not here.

    Faithful: the formulas above, gradient to both x and s, soft assignment not detached, only mu and
    sigma detached. Choices: the per-dimension ``1e-12`` clamp of NASA is applied to the sum (at most
    ``1e-12 * sum_k s_ik`` of difference inside the square root; see :mod:`pml_rll.functional.namr`) to
    keep memory O(N*N); duplicate centres after the floor are dropped (recorded in ``num_centres``);
    the loss is returned per anchor (``reduction_type="element"``) and the default ``MeanReducer`` turns
    it into the NASA global mean.

    Args:
        embedding_size: d, the width of x and of s; inputs must have width ``2 * d``.
        t_values: one t_m per cluster (M = len(t_values) >= 1), distinct finite numbers. (0, 3) is NASA.
        alpha: soft-assignment sharpness (> 0). NASA: 10.
        floor: lower bound of every centre as a fraction of mu (>= 0). NASA: 0.2.
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
        **kwargs: passed to ``BaseMetricLossFunction`` (reducer, collect_stats, ...). A distance object is
            not used: the loss has its own fixed distances.
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
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(embedding_size, int) or isinstance(embedding_size, bool) or embedding_size < 1:
            raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
        try:
            t_list = [float(t) for t in t_values]
        except TypeError as e:
            raise TypeError(f"t_values must be a sequence of numbers, got {t_values!r}") from e
        if len(t_list) < 1:
            raise ValueError("t_values must hold at least one value")
        if not all(math.isfinite(t) for t in t_list):
            raise ValueError(f"t_values must be finite, got {t_values!r}")
        if len(set(t_list)) != len(t_list):
            raise ValueError(f"t_values must be distinct (a repeated t doubles a tier), got {t_values!r}")
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a finite positive number, got {alpha!r}")
        if not (math.isfinite(floor) and floor >= 0):
            raise ValueError(f"floor must be a finite number >= 0, got {floor!r}")
        if center_mode not in ("batch", "per_anchor"):
            raise ValueError(f"center_mode must be 'batch' or 'per_anchor', got {center_mode!r}")
        if neighbourhood_k is not None:
            if not isinstance(neighbourhood_k, int) or isinstance(neighbourhood_k, bool) or neighbourhood_k < 2:
                raise ValueError(f"neighbourhood_k must be None or an int >= 2, got {neighbourhood_k!r}")
            if center_mode != "per_anchor":
                raise ValueError("neighbourhood_k needs center_mode='per_anchor'")
        self.center_mode = center_mode
        self.neighbourhood_k = neighbourhood_k
        self.embedding_size = embedding_size
        self.t_values = tuple(sorted(t_list))
        self.alpha = float(alpha)
        self.floor = float(floor)
        self.stats_include_diagonal = bool(stats_include_diagonal)
        self.detach_sample_embedding = bool(detach_sample_embedding)
        self.add_to_recordable_attributes(
            list_of_names=["embedding_size", "alpha", "floor", "num_t_values"], is_stat=False
        )
        self.add_to_recordable_attributes(
            list_of_names=[
                "mean_distance",
                "std_distance",
                "num_centres",
                "mean_gap_to_nearest_centre",
                "nearest_cluster_fraction",
            ],
            is_stat=True,
        )

    @property
    def num_t_values(self) -> int:
        return len(self.t_values)

    def get_default_reducer(self):
        return MeanReducer()

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        # computed in float32 or float64 whatever the autocast state (half precision is upcast)
        with torch.autocast(embeddings.device.type, enabled=False):
            return super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if indices_tuple is not None:
            raise ValueError(
                "MultiClusterRankingLoss is self-supervised over all ordered pairs; indices_tuple is not supported"
            )
        if ref_emb is not embeddings:
            raise ValueError("MultiClusterRankingLoss works on the batch itself; ref_emb is not supported")
        x, s = F_namr.split_packed(embeddings, self.embedding_size)
        if x.dtype in (torch.float16, torch.bfloat16):  # pairwise sums in float32, as RankedListLoss does
            x, s = x.float(), s.float()
        if x.shape[0] < 2:
            raise ValueError(f"MultiClusterRankingLoss needs a batch of at least 2 embeddings, got {x.shape[0]}")
        if not bool(torch.isfinite(embeddings).all()):
            raise ValueError("embeddings contain non-finite values (NaN or inf)")
        if not bool((s > 0).all()):
            raise ValueError("the structure part s of the packed embeddings must be strictly positive")
        if self.detach_sample_embedding:
            x = x.detach()
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
