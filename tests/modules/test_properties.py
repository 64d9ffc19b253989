"""Property tests of the NAMR modules: finite features give finite packed output with a positive structure part."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pml_rll.modules import NAMREmbedder

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


@SETTINGS
@given(seed=st.integers(0, 1000), scale=st.integers(-3, 3), n=st.integers(1, 5))
def test_embedder_output_is_finite_with_positive_structure(seed, scale, n):
    torch.manual_seed(seed)
    out = NAMREmbedder(6, 3).eval()(torch.randn(n, 6) * 10.0**scale)
    assert torch.isfinite(out).all() and (out[:, 3:] > 0).all()
