"""Pure tensor functions: the math of each method, shared by its loss, reducer and miner."""

from . import ranked_list  # noqa: F401
from .ranked_list_euclidean import ranked_list_euclidean  # noqa: F401
