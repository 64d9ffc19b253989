"""pml_rll.modules"""
