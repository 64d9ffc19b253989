"""pml_rll.miners"""
