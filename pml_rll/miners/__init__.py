"""pml_rll.miners"""
from .sample_embedding_miner import SampleEmbeddingMiner  # noqa: E402,F401
