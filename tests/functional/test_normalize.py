"""l2_normalize: F.normalize's values and gradient, with a hand-written backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pml_rll.functional.normalize import l2_normalize


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-15), (torch.float32, 1e-6)])
def test_same_values_and_gradient_as_f_normalize(dtype, tol):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 9, generator=g, dtype=dtype) * 3
    x[3] = 0.0  # the clamp: x / 1e-12
    x[4] = 1e-14
    x[5] = 1e-6
    upstream = torch.randn(40, 9, generator=g, dtype=dtype)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    qa, qb = l2_normalize(a), F.normalize(b, p=2, dim=1)
    assert torch.equal(qa, qb)
    (qa * upstream).sum().backward()
    (qb * upstream).sum().backward()
    scale = b.grad.abs().amax(1, keepdim=True).clamp_min(1.0)  # the clamped rows' gradients are about 1e12
    assert torch.allclose(a.grad / scale, b.grad / scale, atol=tol, rtol=0)


def test_gradcheck_and_second_use_of_the_output():
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(l2_normalize, (x,))
    q = l2_normalize(x)
    (q.sum() + (q * q).sum()).backward()  # the output used twice: the gradients add up
    y = x.detach().clone().requires_grad_(True)
    r = F.normalize(y, dim=1)
    (r.sum() + (r * r).sum()).backward()
    assert torch.allclose(x.grad, y.grad, atol=1e-14)


def test_second_derivative_and_in_place_use_raise():
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    for upstream in (lambda y: y.pow(3).sum(), lambda y: y.sum()):  # a constant upstream gradient too
        with pytest.raises(RuntimeError, match="l2_normalize.*create_graph=True"):  # never a silently wrong one
            torch.autograd.grad(upstream(l2_normalize(x)), x, create_graph=True)
    y = l2_normalize(x)
    y.mul_(2)
    with pytest.raises(RuntimeError):
        y.sum().backward()


@pytest.mark.parametrize(
    "bad,exc,match",
    [
        ([[1.0, 2.0]], TypeError, "torch.Tensor"),
        (torch.ones(3, 2, dtype=torch.long), TypeError, "floating-point"),
        (torch.ones(3), ValueError, r"shape \(N, D\)"),
        (torch.ones(2, 3, 4), ValueError, r"shape \(N, D\)"),
    ],
)
def test_bad_input_names_the_argument(bad, exc, match):
    with pytest.raises(exc, match=f"x must .*{match}"):
        l2_normalize(bad)


def test_backward_on_another_device_type_does_not_share_the_cpus_buffer():
    """The reused buffer of the backward pass is the CPU's: a backward on another device type (here "meta", which
    every build has) neither takes it nor leaves a buffer of its own for the next CPU backward."""
    other = torch.randn(64, 8, device="meta", requires_grad=True)
    l2_normalize(other).sum().backward()
    x = torch.randn(64, 8, dtype=torch.float32, requires_grad=True)
    l2_normalize(x).pow(3).sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    F.normalize(xr, dim=1).pow(3).sum().backward()
    assert torch.allclose(x.grad, xr.grad, atol=1e-6)
