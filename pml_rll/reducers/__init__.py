"""pml_rll.reducers"""
