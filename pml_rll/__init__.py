"""pml_rll: Ranked List Loss and NAMR for pytorch-metric-learning.

Use it like PML: ``from pml_rll import losses, miners, reducers``.
"""

from __future__ import annotations

__version__ = "0.2.0"

from . import functional, losses, miners, modules, reducers, retrieval, utils  # noqa: E402,F401
