"""The dense, synchronisation-free path equals the list path and the loop reference, and compiles in one graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pml_rll.functional.ranked_list_dense as dense_mod
import pml_rll.functional.ranked_list_euclidean as euclid_mod
from pml_rll.functional.ranked_list import dense_masks, label_masks
from pml_rll.functional.ranked_list_euclidean import ranked_list_euclidean
from pml_rll.functional.ranked_list_params import RankedListParams
from pml_rll.losses import RankedListLoss
from tests.conftest import needs_compile
from tests.reference.ranked_list_loss import reference_losses


def clustered(n=48, dim=8, classes=6, seed=0, dtype=torch.float64, duplicates=True):
    """Clustered embeddings (many non-trivial negatives), with two exact duplicates across classes."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.randn(classes, dim, generator=g)
    x = (0.8 * torch.randn(1, dim, generator=g) + centres[labels] + 0.6 * torch.randn(n, dim, generator=g)).to(dtype)
    if duplicates:
        x[7] = x[6]  # another class: a negative at distance 0
        x[12] = x[0]  # the same class: a trivial positive at distance 0
    return x, labels


def run(path, x, labels, params, paper, ref=None, ref_labels=None, weights=None):
    """Per-query losses and the gradients of a weighted sum of them, on the normalised embeddings."""
    x = x.clone().requires_grad_(True)
    r = None if ref is None else ref.clone().requires_grad_(True)
    q = F.normalize(x, dim=1)
    g = None if r is None else F.normalize(r, dim=1)
    masks = label_masks(labels, labels if ref_labels is None else ref_labels)
    losses, n_pos, n_neg = ranked_list_euclidean(q, g, masks, params=params, paper=paper, path=path)
    w = torch.linspace(0.5, 1.5, len(losses), dtype=losses.dtype) if weights is None else weights
    (losses * w).sum().backward()
    return losses.detach(), x.grad, None if r is None else r.grad, int(n_pos), int(n_neg)


PARAMS = [
    RankedListParams(),  # Tp = 0 (a plain mean), constant shift for N*
    RankedListParams(margin=0.3, Tp=3.0, Tn=50.0),  # running maxima (Tn * alpha too large for a constant shift)
    RankedListParams(margin=0.5, alpha=1.3, Tn=0.0, imbalance=0.3),
]


def assert_same(a, b, tol):
    assert a[3:] == b[3:]  # the counts of non-trivial pairs
    for u, v in zip(a[:3], b[:3]):
        assert (u is None) == (v is None)
        if u is not None:
            assert torch.allclose(u, v, atol=tol, rtol=0), (u - v).abs().max()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("paper", [True, False])
@pytest.mark.parametrize("params", PARAMS)
def test_dense_equals_list_path(dtype, tol, paper, params):
    x, y = clustered(dtype=dtype)
    assert_same(run("dense", x, y, params, paper), run("list", x, y, params, paper), tol)


@pytest.mark.parametrize("paper", [True, False])
def test_dense_equals_reference(paper):
    x, y = clustered(n=20, seed=1, duplicates=False)
    params = RankedListParams(Tn=10.0)
    losses, grad, _, _, _ = run("dense", x, y, params, paper, weights=torch.full((20,), 1 / 20, dtype=x.dtype))
    xr = x.clone().requires_grad_(True)
    ref = reference_losses(xr, y.tolist(), Tn=10.0)
    assert torch.allclose(losses, torch.stack(ref).detach(), atol=1e-12)
    if not paper:  # the reference is differentiated by autograd: the plain derivative of the value
        (g_ref,) = torch.autograd.grad(sum(ref) / 20, xr)
        assert torch.allclose(grad, g_ref, atol=1e-12)


@pytest.mark.parametrize("paper", [True, False])
def test_reference_set_chunked_and_sync_free(monkeypatch, paper):
    """A reference set cut into gallery chunks (running sums), and the fixed-size near-duplicate search."""
    x, y = clustered(n=24, seed=2)
    ref, ref_y = clustered(n=90, seed=3)
    ref[5] = x[3]  # a near-duplicate between the batch and the reference set
    params = RankedListParams(margin=0.3, Tp=2.0, Tn=60.0)
    expected = run("list", x, y, params, paper, ref, ref_y)
    monkeypatch.setattr(dense_mod, "_TILE_ELEMENTS_CPU", 8 * 16)
    monkeypatch.setattr(dense_mod, "_MIN_TILE_ROWS", 8)  # tiles of 8 queries x 16 references
    assert_same(run("dense", x, y, params, paper, ref, ref_y), expected, 1e-12)
    monkeypatch.setattr(dense_mod, "sync_free_wanted", lambda t: True)  # the CUDA / compile code on the CPU
    assert_same(run("dense", x, y, params, paper, ref, ref_y), expected, 1e-12)


def test_sync_free_batch_as_gallery(monkeypatch):
    x, y = clustered(seed=4)
    monkeypatch.setattr(dense_mod, "sync_free_wanted", lambda t: True)
    for paper in (True, False):
        assert_same(run("dense", x, y, RankedListParams(), paper), run("list", x, y, RankedListParams(), paper), 1e-12)


def test_dense_with_pair_masks_and_empty_sets():
    x, y = clustered(n=16, seed=5)
    q = F.normalize(x, dim=1)
    pos = (y[:, None] == y[None, :]) & ~torch.eye(16, dtype=torch.bool)
    neg = y[:, None] != y[None, :]
    pos[3], neg[3] = False, False  # a query without any candidate: loss 0
    neg[:, 5] = False
    params = RankedListParams(Tn=10.0)
    out = {
        p: ranked_list_euclidean(q, None, dense_masks(pos, neg), params=params, paper=True, path=p)
        for p in ("list", "dense")
    }
    assert torch.allclose(out["dense"][0], out["list"][0], atol=1e-12) and out["dense"][0][3] == 0
    assert int(out["dense"][1]) == int(out["list"][1]) and int(out["dense"][2]) == int(out["list"][2])


def test_auto_takes_dense_for_long_lists_on_cpu(monkeypatch):
    taken = []
    real = euclid_mod.ranked_list_dense
    monkeypatch.setattr(euclid_mod, "ranked_list_dense", lambda *a, **k: taken.append("dense") or real(*a, **k))
    params = RankedListParams()
    hard, y = clustered()  # many non-trivial negatives
    ranked_list_euclidean(F.normalize(hard, dim=1), None, label_masks(y, y), params=params, paper=True)
    assert taken == ["dense"]
    spread = torch.randn(48, 64, dtype=torch.float64)  # random directions: no negative closer than alpha
    ranked_list_euclidean(F.normalize(spread, dim=1), None, label_masks(y, y), params=params, paper=True)
    assert taken == ["dense"]


@needs_compile
@pytest.mark.parametrize("gradient", ["paper", "autograd"])
def test_compile_fullgraph_no_graph_break(gradient):
    """torch.compile(loss, fullgraph=True) (which raises at any graph break), forward and backward, equals eager.

    The AOT tracing backend traces forward and backward graphs without generating code: quick on a CPU."""
    import torch._dynamo

    torch._dynamo.reset()
    x, y = clustered(n=16, dim=4, seed=6, dtype=torch.float32, duplicates=False)
    loss = RankedListLoss(margin=0.4, Tn=10.0, gradient=gradient)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    xc, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    lc, le = compiled(xc, y), RankedListLoss(margin=0.4, Tn=10.0, gradient=gradient, path="list")(xe, y)
    lc.backward()
    le.backward()
    assert lc.item() == pytest.approx(le.item(), abs=1e-6)
    assert torch.allclose(xc.grad, xe.grad, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize("path", ["list", "dense", "split"])
@pytest.mark.parametrize("paper", [True, False])
def test_a_second_derivative_raises_instead_of_being_silently_wrong(path, paper):
    """The backward passes are closed forms, not differentiable themselves: create_graph=True raises, naming the
    path, even where the upstream gradient is a constant (a plain backward would return a gradient whose own
    derivative silently treats the closed form as constant)."""
    x, y = clustered(classes=16, duplicates=False)  # 3 per class: sparse positives, the split path applies
    x.requires_grad_(True)
    losses, _, _ = ranked_list_euclidean(x, None, label_masks(y, y), params=RankedListParams(), paper=paper, path=path)
    with pytest.raises(RuntimeError, match=f"{path} path.*create_graph=True"):
        torch.autograd.grad(losses.sum(), x, create_graph=True)
    (grad,) = torch.autograd.grad(losses.sum(), x)  # the graph is intact: a plain gradient still works
    assert torch.count_nonzero(grad) > 0
