"""Argument checks shared by the losses, miners and reducers of this package."""

from __future__ import annotations

import math
import numbers

import torch
from pytorch_metric_learning.distances import BaseDistance
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from torch import Tensor


def check_number(name: str, value, low: float | None = None, high: float | None = None) -> float:
    """A finite real number, optionally inside [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
    return value


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_distance(distance: BaseDistance, owner: str) -> None:
    """Ranked lists need a distance (small = similar), not a similarity."""
    if getattr(distance, "is_inverted", False):
        raise ValueError(
            f"{owner} needs a distance (small = similar), but distance={type(distance).__name__} is a "
            "similarity (is_inverted=True); use e.g. LpDistance()"
        )


def check_embeddings(name: str, emb: Tensor, dim: int | None = None, check_values: bool = True) -> None:
    if not torch.is_tensor(emb):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(emb).__name__}")
    if emb.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(emb.shape)}")
    if not emb.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {emb.dtype}")
    if dim is not None and emb.shape[1] != dim:
        raise ValueError(f"{name} must have {dim} columns like embeddings, got {emb.shape[1]}")
    if check_values and not all_finite(emb):
        raise ValueError(f"{name} contains NaN or infinite values")


def all_finite(t: Tensor) -> bool:
    """Whether every value is finite: the extremes are finite exactly when every value is (NaN propagates), two
    reductions without a temporary of the tensor's size."""
    return t.numel() == 0 or (bool(torch.isfinite(t.amax())) and bool(torch.isfinite(t.amin())))


def check_labels(name: str, labels: Tensor | None, n: int | None = None) -> None:
    if labels is None:
        return
    if not torch.is_tensor(labels):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.ndim != 1 or (n is not None and labels.shape[0] != n):
        raise ValueError(f"{name} must have shape ({n if n is not None else 'N'},), got {tuple(labels.shape)}")


def pairs_to_masks(
    indices_tuple, labels: Tensor | None, ref_labels: Tensor | None, n: int, m: int, device
) -> tuple[Tensor, Tensor]:
    """Dense (n x m) positive / negative masks from a PML pair or triplet tuple."""
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        raise TypeError("indices_tuple must be a PML tuple of 3 (triplets) or 4 (pairs) index tensors")
    a1, p, a2, n_idx = lmu.convert_to_pairs(indices_tuple, labels, ref_labels)
    pos = torch.zeros(n, m, dtype=torch.bool, device=device)
    neg = torch.zeros(n, m, dtype=torch.bool, device=device)
    for name, rows, cols, mask in (("positive", a1, p, pos), ("negative", a2, n_idx, neg)):
        rows, cols = torch.as_tensor(rows, device=device), torch.as_tensor(cols, device=device)
        for t in (rows, cols):
            if t.ndim != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise TypeError(f"indices_tuple: {name} pair indices must be 1-D integer tensors")
        rows, cols = rows.long(), cols.long()
        if rows.shape != cols.shape:
            raise ValueError(f"indices_tuple: {name} anchors and partners differ in length")
        if rows.numel() and (rows.min() < 0 or rows.max() >= n or cols.min() < 0 or cols.max() >= m):
            raise ValueError(f"indices_tuple: {name} pair indices out of range for {n} queries x {m} references")
        mask[rows, cols] = True
    if bool((pos & neg).any()):
        raise ValueError("indices_tuple: a pair is listed both as positive and as negative")
    return pos, neg
