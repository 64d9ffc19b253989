"""L2 normalisation of rows with a hand-written backward pass.

The same values as ``torch.nn.functional.normalize(x, p=2, dim=1)`` (``x / max(||x||, eps)``, eps = 1e-12) and the
same gradient, the Jacobian of the projection applied in closed form: ``(g - q (q . g)) / ||x||`` for a row with
``||x|| > eps`` (``g / eps`` otherwise, where the clamp is constant). Autograd differentiates the same function
through the division, the clamp and the norm, with about twice as many passes over the batch; on a CPU that is
about a tenth of the Ranked List Loss's time at B = 2048 (benchmarks/loss_speed).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..utils.autograd import closed_form_backward
from ..utils.compat import is_compiling
from ..utils.workspace import Workspace

EPS = 1e-12  # as torch.nn.functional.normalize


class _L2Normalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        denom = norm.clamp_min(EPS)
        q: Tensor = x / denom
        ctx.save_for_backward(q, denom, norm > EPS)
        return q

    @staticmethod
    @closed_form_backward("l2_normalize")
    def backward(ctx: Any, g: Tensor) -> Tensor:
        q, denom, projected = ctx.saved_tensors
        # q . g per row; on a CPU through a reused buffer (a new one of the batch's size costs more than the pass)
        reuse = q.is_contiguous() and g.dtype == q.dtype and g.device == q.device
        buffer = Workspace(0, q).get("l2_normalize", *q.shape) if reuse else None  # None off the CPU
        dots = torch.linalg.vecdot(q, g, dim=1) if buffer is None else torch.mul(q, g, out=buffer).sum(1)
        radial = dots[:, None] * projected  # 0 where the clamp is active
        return torch.addcmul(g, q, radial, value=-1).div_(denom)


def l2_normalize(x: Tensor) -> Tensor:
    """Rows of ``x`` divided by their L2 norm (at least 1e-12), as ``F.normalize(x, dim=1)``; a fused backward
    outside ``torch.compile`` (which fuses autograd's own).

    The backward pass uses the output: modifying it in place before ``backward`` raises autograd's error, and
    it is differentiable once (``create_graph=True`` through it raises); use ``F.normalize`` for either. Values
    are not checked for NaN (they propagate, as through ``F.normalize``; the losses check their inputs).
    """
    if not torch.is_tensor(x):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"x must have shape (N, D), got {tuple(x.shape)}")
    if is_compiling():
        return F.normalize(x, p=2, dim=1)
    out: Tensor = _L2Normalize.apply(x)
    return out
