"""Scratch buffers reused between calls on a CPU, shared by the loss paths and the L2 normalisation."""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from .compat import is_compiling

# Tile buffers kept between calls, per thread (a CPU allocator returns large blocks to the system, and a fresh
# block costs a page fault per 4 KiB on first touch: as much as the arithmetic of the tile). Scratch only: every
# buffer is written before it is read.
_SCRATCH = threading.local()


class Workspace:
    """Buffers reused from tile to tile and from call to call, on a CPU (``get(name, b, c)``: a b x c view of the
    buffer of that name and the dtype of ``like``, at least ``elements`` long). Disabled elsewhere: on a GPU the
    caching allocator makes a fresh temporary cheap and frees it early (buffers held for a whole tile raise the
    peak), and under ``torch.compile`` the compiler plans memory; ``get`` then returns None and each operation
    allocates its result."""

    def __init__(self, elements: int, like: Tensor) -> None:
        self.elements, self.like = elements, like
        # (CPU only: the buffers are keyed by name and dtype, one set per thread)
        self.enabled = like.device.type == "cpu" and not is_compiling()
        if self.enabled and not hasattr(_SCRATCH, "buffers"):
            _SCRATCH.buffers = {}

    def get(self, name: str, b: int, c: int) -> Tensor | None:
        """A b x c view of the buffer of this name and dtype (grown when needed); ``None`` where disabled."""
        if not self.enabled:
            return None
        buffers: dict[tuple[str, torch.dtype], Tensor] = _SCRATCH.buffers
        key = (name, self.like.dtype)
        if key not in buffers or buffers[key].numel() < max(self.elements, b * c):
            buffers[key] = self.like.new_empty(max(self.elements, b * c))
        return buffers[key][: b * c].view(b, c)
