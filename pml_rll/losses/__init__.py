"""pml_rll.losses"""
