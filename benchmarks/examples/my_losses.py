"""An example of a user's own loss for ``python -m benchmarks.run --config benchmarks/examples/my_loss.toml``.

Nothing in the runner knows this module: the config file names it (``class = "my_losses:ContrastiveCenterLoss"``)
and the runner imports it from the config file's folder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import ContrastiveLoss


class ContrastiveCenterLoss(torch.nn.Module):
    """PML's contrastive loss plus a pull of each L2-normalized embedding towards a learned centre of its class.

    An illustration of what a config entry can express, not a published method: it needs the number of training
    classes and the embedding width (placeholders ``{num_classes}``, ``{embedding_size}``), has parameters of its
    own (trained at ``loss_lr_multiplier x --lr``) and hyper-parameters to tune.

    Args:
        num_classes: number of training classes (one centre each).
        embedding_size: embedding width.
        pos_margin, neg_margin: the contrastive loss's margins (Learning an Invariant Mapping, CVPR 2006).
        center_weight: weight of the mean squared distance to the class centre.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        pos_margin: float = 0.0,
        neg_margin: float = 1.0,
        center_weight: float = 0.1,
    ) -> None:
        super().__init__()
        if center_weight < 0:
            raise ValueError(f"center_weight must be >= 0, got {center_weight}")
        self.contrastive = ContrastiveLoss(pos_margin=pos_margin, neg_margin=neg_margin)
        self.centers = torch.nn.Parameter(0.01 * torch.randn(num_classes, embedding_size))
        self.center_weight = float(center_weight)

    def forward(self, embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None):
        pull = (F.normalize(embeddings) - F.normalize(self.centers[labels])).pow(2).sum(1).mean()
        return self.contrastive(embeddings, labels, indices_tuple) + self.center_weight * pull
