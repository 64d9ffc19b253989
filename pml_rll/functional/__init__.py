"""pml_rll.functional"""
