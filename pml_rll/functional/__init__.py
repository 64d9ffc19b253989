"""Pure tensor functions: the math of each method, shared by its loss, reducer and miner."""

from __future__ import annotations

from . import ranked_list, ranked_list_euclidean  # noqa: F401
