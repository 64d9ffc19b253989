"""The hyper-parameters of the Ranked List Loss, as one frozen object passed to the functional core by keyword, with
the rules shared by the loss, the miner and the reducer: the default negative boundary and the gradient rules."""

from __future__ import annotations

import dataclasses

# The two gradient rules (docs/ranked_list_loss.md): "paper", constant weights and query-only gradients; "autograd",
# the plain derivative of the loss value.
GRADIENT_MODES = ("paper", "autograd")


def default_alpha(margin: float) -> float:
    """The negative boundary alpha when none is given: ``1 + margin / 2`` (the fixed boundaries of the TPAMI code,
    alpha = 1.2 and alpha - margin = 0.8 at the default margin 0.4)."""
    return 1 + margin / 2


@dataclasses.dataclass(frozen=True)
class RankedListParams:
    """Hyper-parameters of the Ranked List Loss ("Ranked List Loss for Deep Metric Learning", CVPR 2019, eqs. 2-5).

    Args:
        margin: m, the gap between the positive boundary ``alpha - m`` and the negative boundary ``alpha`` (eq. 2).
        alpha: the negative boundary; ``None`` means :func:`default_alpha` of the margin.
        Tp: temperature of the positive weighting (eq. 3; 0 gives a plain mean, the paper's setting).
        Tn: temperature of the negative weighting (eq. 4).
        imbalance: lambda in ``(1 - lambda) * L_P + lambda * L_N`` (eq. 5 in the convention of the metric-learning
            library; the CVPR form ``L_P + l * L_N`` is ``imbalance = l / (1 + l)`` times ``1 + l``).

    The object only carries values: range checks belong to the modules that take user input. The reducer uses
    ``Tp``, ``Tn`` and ``imbalance`` alone (its pair losses already hold the boundaries).
    """

    margin: float = 0.4
    alpha: float | None = None
    Tp: float = 0.0
    Tn: float = 10.0
    imbalance: float = 0.5

    def __post_init__(self) -> None:
        # plain Python floats: the functional core branches on them (never on tensors) and torch.compile specialises
        margin = float(self.margin)
        object.__setattr__(self, "margin", margin)
        object.__setattr__(self, "alpha", default_alpha(margin) if self.alpha is None else float(self.alpha))
        for name in ("Tp", "Tn", "imbalance"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def negative_boundary(self) -> float:
        """alpha: negatives closer than this are non-trivial."""
        assert self.alpha is not None  # resolved in __post_init__
        return self.alpha

    @property
    def positive_boundary(self) -> float:
        """alpha - margin: positives farther than this are non-trivial."""
        return self.negative_boundary - self.margin
