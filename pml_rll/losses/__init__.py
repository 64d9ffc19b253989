"""pml_rll.losses"""
from .multi_cluster_ranking_loss import MultiClusterRankingLoss  # noqa: E402,F401
from .namr_loss import NAMRLoss, make_namr_loss  # noqa: E402,F401
