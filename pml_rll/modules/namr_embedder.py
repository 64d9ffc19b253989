"""NAMREmbedder: the ``models["embedder"]`` of a PML trainer for NAMR, returning packed ``[x || s]``."""

from __future__ import annotations

import torch
from torch import nn

from ..functional import namr as F_namr
from .structure_embedding_head import StructureEmbeddingHead


class NAMREmbedder(nn.Module):
    """Sample head ``Linear(F, d)`` plus a structure head, packed as ``[x || s]`` of width ``2 * d``.

    Paper: NAMR (TCSVT 2022) and the NASA code (AAAI 2022): one backbone, two heads; the sample head is
    a single linear layer with no normalisation (docs/namr.md, section 3.1). PML trainers and testers pass one
    tensor around, so the two embeddings travel packed (docs/namr.md, section 3.3); :meth:`split` (or
    :func:`pml_rll.functional.namr.split_packed`) separates them.

    The output must never be L2-normalised as a whole: build testers with ``normalize_embeddings=False``
    and evaluate with :class:`pml_rll.retrieval.NAMRReRankKNN`. NASA's mean-distance scaling of x is done
    by :class:`pml_rll.losses.NAMRLoss` during training, so this module's output does not depend on the
    batch.

    Args:
        in_features: F, width of the trunk output.
        embedding_size: d (NASA: 512).
        structure_head: module mapping (N, F) features to (N, d) strictly positive weights; default
            ``StructureEmbeddingHead(in_features, embedding_size)``.
    """

    def __init__(self, in_features: int, embedding_size: int = 512, structure_head: nn.Module | None = None):
        super().__init__()
        for name, value in (("in_features", in_features), ("embedding_size", embedding_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.in_features = in_features
        self.embedding_size = embedding_size
        self.sample_head = nn.Linear(in_features, embedding_size)
        if structure_head is None:
            structure_head = StructureEmbeddingHead(in_features, embedding_size)
        elif getattr(structure_head, "embedding_size", embedding_size) != embedding_size:
            raise ValueError(
                f"structure_head.embedding_size ({structure_head.embedding_size}) != embedding_size ({embedding_size})"
            )
        self.structure_head = structure_head

    @property
    def output_size(self) -> int:
        return 2 * self.embedding_size

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[1] != self.in_features:
            raise ValueError(f"features must have shape (batch, {self.in_features}), got {tuple(features.shape)}")
        x = self.sample_head(features)
        s = self.structure_head(features)
        if s.shape != x.shape:
            raise ValueError(f"structure_head returned shape {tuple(s.shape)}, expected {tuple(x.shape)}")
        return F_namr.pack(x, s)

    def split(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, s) from this embedder's packed output."""
        return F_namr.split_packed(packed, self.embedding_size)
