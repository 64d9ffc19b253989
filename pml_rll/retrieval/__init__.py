"""pml_rll.retrieval"""
