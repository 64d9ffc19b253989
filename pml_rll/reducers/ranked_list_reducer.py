"""RankedListReducer: the ranked-list reduction of any PML pair loss (docs/ranked_list_loss.md, section 2.4)."""

from __future__ import annotations

import torch
from pytorch_metric_learning.reducers import MultipleReducers
from torch import Tensor

from ..functional.ranked_list import is_non_trivial, ranked_lists
from ..functional.ranked_list_params import GRADIENT_MODES, RankedListParams
from ..utils.validation import (
    check_choice,
    check_embeddings,
    check_finite,
    check_not_meta,
    check_number,
    check_temperature,
)


class RankedListReducer(MultipleReducers):
    """Ranked-list reduction of any pair loss (Ranked List Loss, CVPR 2019, eqs. 3-5).

    Takes the ``pos_pair`` and ``neg_pair`` losses of a PML pair loss (e.g. ``ContrastiveLoss``), treats pairs with
    zero loss as trivial, weights the non-trivial ones inside each anchor's positive and negative set by
    ``exp(T * loss)`` (normalised per set, max-shifted), combines ``(1 - imbalance) * L_P + imbalance * L_N`` per
    anchor and averages over all queries (``embeddings.shape[0]``, anchors without pairs counting as 0).

    A pair listed several times counts once. ``ContrastiveLoss(pos_margin=alpha - margin, neg_margin=alpha,
    reducer=RankedListReducer(...))`` equals
    ``RankedListLoss(margin, alpha=alpha, ...)`` in value. Gradients: with ``gradient="autograd"`` they are equal
    too; with ``gradient="paper"`` the reducer holds the weights constant, and the paper's query-only rule comes
    from calling the pair loss with the detached batch as reference: ``loss(emb, labels, ref_emb=emb.detach(),
    ref_labels=labels)``.

    Args:
        Tp: temperature of the positive weighting.
        Tn: temperature of the negative weighting.
        imbalance: lambda in [0, 1].
        gradient: ``"paper"`` (constant weights) or ``"autograd"`` (weights differentiated).

    Temperatures lie in [0, 1e4] as in ``RankedListLoss`` (:data:`pml_rll.utils.validation.MAX_TEMPERATURE`); an
    out-of-range hyper-parameter raises :class:`~pml_rll.utils.validation.HyperParameterError` (a ``ValueError`` and
    an ``AssertionError``). Each call checks, before recording anything, that ``loss_dict`` is a PML loss dict with
    finite losses and that ``embeddings`` is a 2-D floating-point tensor, not on the meta device (which of the pairs
    count depends on their values); otherwise a ``TypeError``/``ValueError`` names the argument.

    The result has the embeddings' dtype, as with PML's reducers; half-precision pair losses are reduced in float32.

    Other sub-losses in the loss dict (e.g. regularisers) are reduced with ``MeanReducer`` and added, as PML's
    ``MultipleReducers`` does.
    """

    def __init__(self, Tp: float = 0.0, Tn: float = 10.0, imbalance: float = 0.5, gradient: str = "paper", **kwargs):
        Tp, Tn = check_temperature("Tp", Tp), check_temperature("Tn", Tn)
        imbalance = check_number("imbalance", imbalance, 0.0, 1.0)
        gradient = check_choice("gradient", gradient, GRADIENT_MODES)
        super().__init__(reducers={}, **kwargs)
        self.Tp, self.Tn, self.imbalance, self.gradient = Tp, Tn, imbalance, gradient
        self.add_to_recordable_attributes(list_of_names=["Tp", "Tn", "imbalance"], is_stat=False)
        self.add_to_recordable_attributes(
            list_of_names=["avg_num_pos_per_query", "avg_num_neg_per_query"], is_stat=True
        )

    @staticmethod
    def check_input(loss_dict, embeddings, labels=None) -> None:
        """Raise on bad input to :meth:`forward` (nothing is computed or recorded)."""
        if not isinstance(loss_dict, dict):
            raise TypeError(f"loss_dict must be a dict of PML loss entries, got {type(loss_dict).__name__}")
        check_embeddings("embeddings", embeddings, check_values=False)
        check_not_meta("embeddings", embeddings, "RankedListReducer", "the non-trivial pairs are chosen by value")
        for name, info in loss_dict.items():
            if not isinstance(info, dict) or "reduction_type" not in info or "losses" not in info:
                raise TypeError(f"loss_dict[{name!r}] must be a dict with 'losses', 'indices' and 'reduction_type'")
            if torch.is_tensor(info["losses"]):
                check_finite(f"loss_dict[{name!r}]['losses']", info["losses"].reshape(-1))

    def forward(self, loss_dict, embeddings, labels):
        """PML's reducer call: reduce a pair loss's dictionary with the Ranked List weighting of each query's lists.

        Args:
            loss_dict: PML's loss dictionary (``"pos_pair"`` and ``"neg_pair"`` entries with per-pair losses).
            embeddings: (N, D) the batch, for the number of queries and the device.
            labels: (N,) labels, or ``None``.

        Returns:
            The reduced loss, a scalar tensor of the embeddings' dtype.
        """
        self.check_input(loss_dict, embeddings, labels)
        self.reset_stats()
        pairs = {"pos_pair": None, "neg_pair": None}
        others = []
        for name, info in loss_dict.items():
            kind = info["reduction_type"]
            if kind in pairs and pairs[kind] is None:
                pairs[kind] = info
            elif kind in pairs:
                raise ValueError(f"RankedListReducer expects one {kind} loss, got several")
            else:
                others.append((name, info))
        if pairs["pos_pair"] is None and pairs["neg_pair"] is None:
            if others and all(info["reduction_type"] == "already_reduced" for _, info in others):
                # what a PML pair loss returns when it has no pairs at all (e.g. an empty miner output)
                out = sum(self.default_reducer({n: i}, embeddings, labels) for n, i in others)
                return out.to(embeddings.dtype) if torch.is_tensor(out) else out
            raise ValueError("RankedListReducer needs pos_pair and/or neg_pair losses (a pair loss)")
        n = embeddings.shape[0]
        pos_loss, pos_query = self._non_trivial(pairs["pos_pair"], embeddings)
        neg_loss, neg_query = self._non_trivial(pairs["neg_pair"], embeddings)
        params = RankedListParams(Tp=self.Tp, Tn=self.Tn, imbalance=self.imbalance)
        r = ranked_lists(
            pos_loss, pos_query, neg_loss, neg_query, n, params=params, detach_weights=self.gradient == "paper"
        )
        if self.collect_stats:
            self.avg_num_pos_per_query = len(pos_loss) / n
            self.avg_num_neg_per_query = len(neg_loss) / n
        total = r.losses.mean()
        for name, info in others:
            total = total + self.default_reducer({name: info}, embeddings, labels)
        # half-precision pair losses are reduced in float32; the result has the embeddings' dtype, as PML's reducers
        return total.to(embeddings.dtype)

    @staticmethod
    def _non_trivial(info: dict | None, embeddings: Tensor) -> tuple[Tensor, Tensor]:
        """Pairs with a positive loss (the non-trivial ones) and their anchors."""
        losses = None if info is None else info["losses"]
        if info is None or not torch.is_tensor(losses) or losses.numel() == 0:
            return embeddings.new_zeros(0), torch.zeros(0, dtype=torch.long, device=embeddings.device)
        anchors = info["indices"][0]
        if losses.shape != anchors.shape:
            raise ValueError("pair losses and their anchor indices differ in length")
        if losses.dtype in (torch.float16, torch.bfloat16):
            losses = losses.float()
        anchors, partners = anchors.long(), info["indices"][1].long()
        # a pair listed twice (e.g. by several triplets) is one member of its set, as in RankedListLoss
        key = anchors * (int(partners.max()) + 1) + partners
        unique, inverse = torch.unique(key, return_inverse=True)
        first = torch.full_like(unique, len(key)).scatter_reduce(
            0, inverse, torch.arange(len(key), device=key.device), "amin"
        )
        losses, anchors = losses[first], anchors[first]
        keep = is_non_trivial(losses)
        return losses[keep], anchors[keep]
