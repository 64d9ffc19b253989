"""StructureEmbeddingHead and NAMREmbedder: range, frozen BatchNorm, packing (docs/namr.md, sections 3.1-3.3)."""

from __future__ import annotations

import pytest
import torch

from pml_rll.functional import namr as F_namr
from pml_rll.modules import NAMREmbedder, StructureEmbeddingHead


def _bn_state(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("s_range", [(0.5, 1.5), (0.1, 3.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_head_output_strictly_inside_range_even_when_saturated(s_range, dtype):
    torch.manual_seed(0)
    head = StructureEmbeddingHead(8, 5, hidden=16, s_range=s_range).to(dtype)
    feats = torch.randn(64, 8, dtype=dtype)
    s = head(feats)
    assert s.shape == (64, 5) and s.dtype == dtype
    assert (s > s_range[0]).all() and (s < s_range[1]).all()
    # saturate the sigmoid in both directions: outputs must still be strictly inside
    with torch.no_grad():
        head.layers[3].bias.copy_(torch.tensor([1e4, -1e4, 50.0, -50.0, 0.0], dtype=dtype))
        head.layers[3].weight.zero_()
    s = head(feats)
    assert (s > s_range[0]).all() and (s < s_range[1]).all()
    assert s[:, 0].max() == torch.nextafter(torch.tensor(s_range[1], dtype=dtype), torch.tensor(0.0, dtype=dtype))
    assert s[:, 1].min() == torch.nextafter(torch.tensor(s_range[0], dtype=dtype), torch.tensor(9.0, dtype=dtype))


def test_head_matches_nasa_form_at_init():
    # frozen BN at init (mean 0, var 1): s = s_min + (s_max - s_min) * sigmoid(BN(L2(BN(L1 f))))
    torch.manual_seed(1)
    head = StructureEmbeddingHead(6, 4, hidden=10).double()
    head.train()
    f = torch.randn(5, 6, dtype=torch.float64)
    l1, bn1, l2, bn2 = head.layers
    eps = bn1.eps
    z = l2(l1(f) / (1 + eps) ** 0.5 * bn1.weight + bn1.bias)
    z = z / (1 + eps) ** 0.5 * bn2.weight + bn2.bias
    torch.testing.assert_close(head(f), 0.5 + torch.sigmoid(z), rtol=1e-12, atol=1e-12)


def test_frozen_bn_running_stats_unchanged_under_train():
    torch.manual_seed(2)
    head = StructureEmbeddingHead(8, 4, hidden=16, freeze_bn=True)
    before = _bn_state(head)
    head.train()
    assert head.training and all(not m.training for m in head.modules() if isinstance(m, torch.nn.BatchNorm1d))
    head(torch.randn(32, 8) * 5 + 3)
    after = _bn_state(head)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # a model containing the head: model.train() must not unfreeze it either
    model = torch.nn.Sequential(torch.nn.Identity(), head)
    model.train()
    model(torch.randn(32, 8) * 5 + 3)
    assert all(torch.equal(before[k], v) for k, v in _bn_state(head).items())
    # batch of one works in training mode when BN is frozen
    assert head(torch.randn(1, 8)).shape == (1, 4)


def test_unfrozen_bn_updates_running_stats():
    torch.manual_seed(3)
    head = StructureEmbeddingHead(8, 4, hidden=16, freeze_bn=False)
    before = _bn_state(head)
    head.train()
    head(torch.randn(32, 8) * 5 + 3)
    after = _bn_state(head)
    assert not torch.equal(before["layers.1.running_mean"], after["layers.1.running_mean"])


def test_head_validation():
    with pytest.raises(ValueError, match="s_range"):
        StructureEmbeddingHead(4, 4, s_range=(1.5, 0.5))
    with pytest.raises(ValueError, match="s_range"):
        StructureEmbeddingHead(4, 4, s_range=(-0.1, 1.0))
    with pytest.raises(ValueError, match="hidden"):
        StructureEmbeddingHead(4, 4, hidden=0)
    with pytest.raises(ValueError, match="features must have width"):
        StructureEmbeddingHead(4, 4)(torch.randn(3, 5))


def test_embedder_packs_and_splits():
    torch.manual_seed(4)
    emb = NAMREmbedder(10, embedding_size=6)
    emb.train()
    f = torch.randn(7, 10)
    out = emb(f)
    assert out.shape == (7, 12) and emb.output_size == 12
    x, s = emb.split(out)
    torch.testing.assert_close(x, emb.sample_head(f), rtol=0, atol=0)
    torch.testing.assert_close(s, emb.structure_head(f), rtol=0, atol=0)
    assert (s > 0.5).all() and (s < 1.5).all()
    # round trip
    torch.testing.assert_close(F_namr.pack(*F_namr.split_packed(out, 6)), out, rtol=0, atol=0)
    # output does not depend on the batch (no batch statistics): one row alone equals its row in the batch
    torch.testing.assert_close(emb(f[3:4]), out[3:4], rtol=1e-6, atol=1e-6)


def test_embedder_custom_head_and_errors():
    head = StructureEmbeddingHead(10, 6, hidden=8, s_range=(0.2, 2.0))
    emb = NAMREmbedder(10, 6, structure_head=head)
    assert emb.structure_head is head
    with pytest.raises(ValueError, match="embedding_size"):
        NAMREmbedder(10, 5, structure_head=head)
    with pytest.raises(ValueError, match="features must have width"):
        emb(torch.randn(3, 9))
    with pytest.raises(ValueError, match="width 2 \\* embedding_size"):
        emb.split(torch.randn(3, 11))
    with pytest.raises(ValueError, match="same shape"):
        F_namr.pack(torch.randn(3, 4), torch.randn(3, 5))
