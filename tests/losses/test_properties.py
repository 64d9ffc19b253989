"""Property tests of the losses: random finite input gives a finite loss and gradient for every allowed
hyper-parameter; the losses do not depend on the order of the batch or on the names of the classes; a rejected
call leaves the statistics and the cross-batch memory as they were."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pytorch_metric_learning import distances

from pml_rll.losses import CrossBatchMemory, MultiClusterRankingLoss, NAMRLoss, RankedListLoss
from pml_rll.utils.validation import MAX_TEMPERATURE

SETTINGS = settings(
    max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
temperatures = st.one_of(st.sampled_from([0.0, 1.0, 74.0, MAX_TEMPERATURE]), st.floats(0.0, MAX_TEMPERATURE))


@st.composite
def batches(draw, min_n=2, max_n=8, max_d=5, dtypes=(torch.float32, torch.float64)):
    """(embeddings, labels): random finite values over several magnitudes, a few classes, duplicate rows allowed."""
    n, d = draw(st.integers(min_n, max_n)), draw(st.integers(1, max_d))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = 10.0 ** draw(st.integers(-3, 3))
    emb = (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(draw(st.sampled_from(dtypes)))
    if draw(st.booleans()):
        emb[-1] = emb[0]  # identical embeddings (distance 0)
    labels = torch.randint(0, draw(st.integers(1, 4)), (n,), generator=g)
    return emb, labels


def _finite_loss_and_grad(loss, emb, *args):
    emb = emb.clone().requires_grad_(True)
    value = loss(emb, *args)
    value.backward()
    assert torch.isfinite(value), value
    assert torch.isfinite(emb.grad).all()


@SETTINGS
@given(
    batch=batches(dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64)),
    Tn=temperatures,
    Tp=temperatures,
    margin=st.floats(0.0, 2.0),
    imbalance=st.floats(0.0, 1.0),
    gradient=st.sampled_from(["paper", "autograd"]),
    normalize=st.booleans(),
)
def test_ranked_list_loss_is_finite(batch, Tn, Tp, margin, imbalance, gradient, normalize):
    emb, labels = batch
    distance = distances.LpDistance(normalize_embeddings=normalize)
    loss = RankedListLoss(margin=margin, Tn=Tn, Tp=Tp, imbalance=imbalance, gradient=gradient, distance=distance)
    _finite_loss_and_grad(loss, emb, labels)


@SETTINGS
@given(batch=batches(max_d=4), alpha=st.floats(1e-3, MAX_TEMPERATURE), s_scale=st.integers(-3, 3))
def test_structure_losses_are_finite(batch, alpha, s_scale):
    x, labels = batch
    x = x.double()
    d = x.shape[1]
    s = torch.rand(x.shape, generator=torch.Generator().manual_seed(d), dtype=x.dtype) * 10.0**s_scale + 1e-3
    _finite_loss_and_grad(MultiClusterRankingLoss(d, alpha=alpha), torch.cat([x, s], 1))
    _finite_loss_and_grad(NAMRLoss(RankedListLoss(), d), torch.cat([x, s], 1), labels)


@st.composite
def permuted(draw):
    emb, labels = draw(batches(min_n=3, dtypes=(torch.float64,)))
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(draw(st.integers(0, 1000))))
    new_names = torch.randperm(10, generator=torch.Generator().manual_seed(draw(st.integers(0, 1000)))) * 3 - 7
    return emb, labels, perm, new_names[labels]


@SETTINGS
@given(case=permuted(), Tn=st.floats(0.0, 50.0), gradient=st.sampled_from(["paper", "autograd"]))
def test_ranked_list_loss_ignores_order_and_class_names(case, Tn, gradient):
    emb, labels, perm, renamed = case
    loss = RankedListLoss(Tn=Tn, gradient=gradient)
    base = loss(emb, labels)
    torch.testing.assert_close(loss(emb[perm], labels[perm]), base, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(loss(emb, renamed), base, rtol=1e-12, atol=0.0)


@SETTINGS
@given(case=permuted())
def test_namr_losses_ignore_order_and_class_names(case):
    x, labels, perm, renamed = case
    d = x.shape[1]
    packed = torch.cat([x, 0.5 + torch.rand(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)], 1)
    mcr = MultiClusterRankingLoss(d)
    torch.testing.assert_close(mcr(packed[perm]), mcr(packed), rtol=1e-9, atol=1e-12)
    namr = NAMRLoss(RankedListLoss(), d)
    base = namr(packed, labels)
    torch.testing.assert_close(namr(packed[perm], labels[perm]), base, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(namr(packed, renamed), base, rtol=1e-12, atol=0.0)


@st.composite
def spoiled(draw, n, d):
    """A bad batch: one non-finite value, a wrong width, or labels of the wrong kind."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
    emb, labels = torch.randn(n, d, generator=g), torch.randint(0, 3, (n,), generator=g)
    kind = draw(st.sampled_from(["nan", "inf", "width", "float labels", "short labels"]))
    if kind in ("nan", "inf"):
        emb[draw(st.integers(0, n - 1)), draw(st.integers(0, d - 1))] = float(kind)
    elif kind == "width":
        emb = torch.randn(n, d + 1, generator=g)
    elif kind == "float labels":
        labels = labels.float()
    else:
        labels = labels[:-1]
    return emb, labels


@SETTINGS
@given(steps=st.lists(st.one_of(st.integers(1, 6), spoiled(5, 3)), min_size=2, max_size=6), memory=st.integers(6, 12))
def test_rejected_batches_leave_memory_and_statistics_unchanged(steps, memory, unchanged):
    cbm = CrossBatchMemory(RankedListLoss(collect_stats=True), 3, memory_size=memory)
    g = torch.Generator().manual_seed(memory)
    for step in steps:
        if isinstance(step, int):  # a clean batch of that size
            value = cbm(torch.randn(step, 3, generator=g), torch.randint(0, 3, (step,), generator=g))
            assert torch.isfinite(value)
        else:
            with unchanged(cbm), pytest.raises((ValueError, TypeError)):
                cbm(*step)
