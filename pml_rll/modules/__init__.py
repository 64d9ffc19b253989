"""pml_rll.modules"""

from __future__ import annotations

from .namr_embedder import NAMREmbedder  # noqa: E402,F401
from .structure_embedding_head import StructureEmbeddingHead  # noqa: E402,F401
