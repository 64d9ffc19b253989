"""StructureEmbeddingHead: the per-dimension structure weights s of NAMR/NASA."""

from __future__ import annotations

import math

import torch
from torch import nn


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
    """

    def __init__(
        self,
        in_features: int,
        embedding_size: int,
        hidden: int = 512,
        s_range: tuple[float, float] = (0.5, 1.5),
        freeze_bn: bool = True,
    ):
        super().__init__()
        for name, value in (("in_features", in_features), ("embedding_size", embedding_size), ("hidden", hidden)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if len(s_range) != 2:
            raise ValueError(f"s_range must be (s_min, s_max), got {s_range!r}")
        s_min, s_max = float(s_range[0]), float(s_range[1])
        if not (math.isfinite(s_min) and math.isfinite(s_max) and 0 <= s_min < s_max):
            raise ValueError(f"s_range must satisfy 0 <= s_min < s_max (finite), got {s_range!r}")
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
        super().train(mode)
        if self.freeze_bn:
            self._freeze_bn()
        return self

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[1] != self.in_features:
            raise ValueError(f"features must have shape (batch, {self.in_features}), got {tuple(features.shape)}")
        s_min, s_max = self.s_range
        s = s_min + (s_max - s_min) * torch.sigmoid(self.layers(features))
        lo = torch.nextafter(torch.tensor(s_min, dtype=s.dtype), torch.tensor(s_max, dtype=s.dtype))
        hi = torch.nextafter(torch.tensor(s_max, dtype=s.dtype), torch.tensor(s_min, dtype=s.dtype))
        return s.clamp(min=lo.item(), max=hi.item())
