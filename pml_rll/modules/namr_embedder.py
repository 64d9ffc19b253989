"""NAMREmbedder: the ``models["embedder"]`` of a PML trainer for NAMR, returning packed ``[x || s]``."""

from __future__ import annotations

import torch
from torch import nn

from ..functional import namr as F_namr
from ..utils.validation import check_callable, check_features, check_int
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

    Sizes are ints (numpy ints too). ``forward`` checks that ``features`` is a 2-D floating-point (batch, F)
    tensor with finite values before any layer runs.
    """

    def __init__(self, in_features: int, embedding_size: int = 512, structure_head: nn.Module | None = None):
        in_features = check_int("in_features", in_features)
        embedding_size = check_int("embedding_size", embedding_size)
        check_callable("structure_head", structure_head, optional=True)
        super().__init__()
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
        """The width of the output, ``2 * embedding_size`` (the packed ``[x || s]``)."""
        return 2 * self.embedding_size

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Features (N, in_features) to the packed embeddings ``[x || s]`` (N, 2 * embedding_size)."""
        check_features(features, self)
        x = self.sample_head(features)
        s = self.structure_head(features)
        if s.shape != x.shape:
            raise ValueError(f"structure_head returned shape {tuple(s.shape)}, expected {tuple(x.shape)}")
        return F_namr.pack(x, s)

    def split(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, s) from this embedder's packed output."""
        return F_namr.split_packed(packed, self.embedding_size)
