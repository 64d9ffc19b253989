"""Shared fixtures and batch builders of the test suite.

The builders are plain functions (import them with ``from tests.conftest import ...``) so that parametrised tests
can call them with their own sizes and seeds; each draws from its own seeded generator, never the global one.
"""

from __future__ import annotations

import math

import pytest
import torch

F64 = torch.float64


@pytest.fixture
def one_thread():
    # tiny tensors: thread hand-off costs more than it saves on a busy 2-core machine
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def unit_circle(degrees, dtype=F64):
    """2-D points on the unit circle at the given angles in degrees (the hand cases of docs/ranked_list_loss.md)."""
    a = torch.tensor(degrees, dtype=F64) * math.pi / 180
    return torch.stack([torch.cos(a), torch.sin(a)], 1).to(dtype)


def hand_case(angles, labels, dtype=F64):
    """(embeddings on the unit circle, labels) of a hand-checkable case."""
    return unit_circle(angles, dtype), torch.tensor(labels)


def paired_batch(n=20, dim=5, classes=5, seed=0, noise=0.3, dtype=F64):
    """Random embeddings in which every odd row lies ``noise`` away from the row before it, random labels.

    The close pairs populate both the positive and the negative sets of the Ranked List Loss at margin 0.4.
    Drawn in float64, then cast to ``dtype``. Returns (x (n x dim), labels (n,)).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=F64)
    x[1::2] = x[0::2] + noise * torch.randn(n // 2, dim, generator=g, dtype=F64)
    y = torch.randint(0, classes, (n,), generator=g)
    return x.to(dtype), y


def sample_and_structure(n, d, seed=0, dtype=F64, scale=1.0, offset=0.0, s_one=False):
    """NAMR inputs: sample embeddings x = scale * randn + offset and structure weights s in [0.5, 1.5).

    ``s_one`` gives s = 1 everywhere (the adaptive distance is then the Euclidean one). Returns (x, s), each n x d.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype) * scale + offset
    s = torch.ones(n, d, dtype=dtype) if s_one else 0.5 + torch.rand(n, d, generator=g, dtype=dtype)
    return x, s
