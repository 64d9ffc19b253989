"""StructureEmbeddingHead: the per-dimension structure weights s of NAMR/NASA."""

from __future__ import annotations

import torch
from torch import nn

from ..utils.validation import check_bool, check_features, check_int, check_numbers


class StructureEmbeddingHead(nn.Module):
    """``Linear(F, hidden) -> BatchNorm1d -> Linear(hidden, d) -> BatchNorm1d -> sigmoid``, mapped to ``s_range``.

    Paper: NAMR (TCSVT 2022) gives every image a structure embedding next to its sample embedding; the
    NASA code (AAAI 2022) builds it as above with ``s = 0.5 + sigmoid(.)``, i.e. every component in
    (0.5, 1.5), the same width d as the sample embedding (docs/namr.md, section 3.2).

    Faithful: the layer stack, the range (0.5, 1.5) and frozen BatchNorm (NASA puts every BN layer in
    eval mode, so the running statistics stay at mean 0, variance 1 and each BN acts as a learnable
    per-channel affine map). Choices: ``hidden`` and ``s_range`` are configurable (NAMR's values are
    unknown); the output is clamped to the nearest representable values strictly inside ``s_range`` so
    a saturated sigmoid can never return an endpoint.

    Args:
        in_features: F, width of the backbone feature.
        embedding_size: d, width of s (equal to the sample embedding's width).
        hidden: width of the hidden layer (NASA: 512).
        s_range: (s_min, s_max) with 0 <= s_min < s_max (NASA: (0.5, 1.5)).
        freeze_bn: keep the BatchNorm layers in eval mode even under ``.train()`` (NASA: True).

    Sizes are ints (numpy ints too), ``s_range`` a pair of finite numbers, ``freeze_bn`` a bool. ``forward`` checks
    that ``features`` is a 2-D floating-point (batch, F) tensor with finite values before any layer runs (so a
    rejected batch never updates BatchNorm statistics when they are not frozen).
    """

    def __init__(
        self,
        in_features: int,
        embedding_size: int,
        hidden: int = 512,
        s_range: tuple[float, float] = (0.5, 1.5),
        freeze_bn: bool = True,
    ):
        in_features = check_int("in_features", in_features)
        embedding_size = check_int("embedding_size", embedding_size)
        hidden = check_int("hidden", hidden)
        bounds = check_numbers("s_range", s_range, min_len=2, low=0.0)
        if len(bounds) != 2 or bounds[0] >= bounds[1]:
            raise ValueError(f"s_range must be (s_min, s_max) with 0 <= s_min < s_max, got {s_range!r}")
        s_min, s_max = bounds
        freeze_bn = check_bool("freeze_bn", freeze_bn)
        super().__init__()
        self.in_features = in_features
        self.embedding_size = embedding_size
        self.s_range = (s_min, s_max)
        self.freeze_bn = bool(freeze_bn)
        self.layers = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.BatchNorm1d(hidden),
            nn.Linear(hidden, embedding_size),
            nn.BatchNorm1d(embedding_size),
        )
        if self.freeze_bn:
            self._freeze_bn()

    def _freeze_bn(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    def train(self, mode: bool = True):
        """``nn.Module.train``; with ``freeze_bn`` the BatchNorm layers stay in evaluation mode. Returns the module."""
        super().train(mode)
        if self.freeze_bn:
            self._freeze_bn()
        return self

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Features (N, in_features) to structure embeddings s (N, embedding_size), each entry in ``s_range``."""
        check_features(features, self)
        s_min, s_max = self.s_range
        s = s_min + (s_max - s_min) * torch.sigmoid(self.layers(features))
        lo = torch.nextafter(torch.tensor(s_min, dtype=s.dtype), torch.tensor(s_max, dtype=s.dtype))
        hi = torch.nextafter(torch.tensor(s_max, dtype=s.dtype), torch.tensor(s_min, dtype=s.dtype))
        return s.clamp(min=lo.item(), max=hi.item())
