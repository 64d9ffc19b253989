"""Bad input to the NAMR modules: a TypeError/ValueError that names the argument, and no buffer changed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pml_rll.modules import NAMREmbedder, StructureEmbeddingHead

F, D = 6, 4
NAN = float("nan")

BAD_CONSTRUCTION = [
    ("head in_features 0", lambda: StructureEmbeddingHead(0, D), ValueError, "in_features"),
    ("head in_features float", lambda: StructureEmbeddingHead(6.0, D), TypeError, "in_features"),
    ("head in_features bool", lambda: StructureEmbeddingHead(True, D), TypeError, "in_features"),
    ("head embedding_size 0", lambda: StructureEmbeddingHead(F, 0), ValueError, "embedding_size"),
    ("head hidden str", lambda: StructureEmbeddingHead(F, D, hidden="8"), TypeError, "hidden"),
    ("head s_range None", lambda: StructureEmbeddingHead(F, D, s_range=None), TypeError, "s_range"),
    ("head s_range str", lambda: StructureEmbeddingHead(F, D, s_range="ab"), TypeError, "s_range"),
    ("head s_range one", lambda: StructureEmbeddingHead(F, D, s_range=(1.0,)), ValueError, "s_range"),
    ("head s_range three", lambda: StructureEmbeddingHead(F, D, s_range=(0, 1, 2)), ValueError, "s_range"),
    ("head s_range reversed", lambda: StructureEmbeddingHead(F, D, s_range=(1.5, 0.5)), ValueError, "s_range"),
    ("head s_range negative", lambda: StructureEmbeddingHead(F, D, s_range=(-0.1, 1)), ValueError, "s_range"),
    ("head s_range inf", lambda: StructureEmbeddingHead(F, D, s_range=(0, float("inf"))), ValueError, "s_range"),
    ("head freeze_bn int", lambda: StructureEmbeddingHead(F, D, freeze_bn=1), TypeError, "freeze_bn"),
    ("embedder in_features 0", lambda: NAMREmbedder(0, D), ValueError, "in_features"),
    ("embedder size float", lambda: NAMREmbedder(F, np.float64(4)), TypeError, "embedding_size"),
    ("embedder head", lambda: NAMREmbedder(F, D, structure_head=3), TypeError, "structure_head"),
    (
        "embedder head size",
        lambda: NAMREmbedder(F, D, structure_head=StructureEmbeddingHead(F, D + 1)),
        ValueError,
        "embedding_size",
    ),
]


def test_bad_construction(bad_construction, rejects):
    rejects(*bad_construction)


def test_numpy_sizes_are_accepted():
    head = StructureEmbeddingHead(np.int64(F), np.int32(D), hidden=np.int16(8), s_range=np.array([0.5, 1.5]))
    assert (head.in_features, head.embedding_size, head.s_range) == (F, D, (0.5, 1.5))
    assert NAMREmbedder(np.int64(F), np.int64(D)).output_size == 2 * D


X = torch.randn(5, F, generator=torch.Generator().manual_seed(0))
BAD_FEATURES = [
    ("list", X.tolist(), TypeError),
    ("1-D", X[0], ValueError),
    ("3-D", X[None], ValueError),
    ("int", X.long(), TypeError),
    ("width", X[:, :-1], ValueError),
    ("float64", X.double(), TypeError),
    ("nan", X.index_put((torch.tensor([3]), torch.tensor([2])), torch.tensor(NAN)), ValueError),
    ("inf", X.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("inf"))), ValueError),
]


@pytest.mark.parametrize("case", BAD_FEATURES, ids=[c[0] for c in BAD_FEATURES])
@pytest.mark.parametrize(
    "make", [lambda: StructureEmbeddingHead(F, D, hidden=8, freeze_bn=False), lambda: NAMREmbedder(F, D)]
)
def test_bad_features_raise_and_change_no_buffer(case, make, rejects):
    _, features, exc = case
    module = make().train()  # BatchNorm statistics would move on any batch that got through
    module(X)
    rejects(lambda: module(features), exc, "features", obj=module)


def test_other_dtypes_run_under_autocast():
    module = NAMREmbedder(F, D).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(X.bfloat16())
    assert out.shape == (5, 2 * D) and torch.isfinite(out).all()
