"""Shared fixtures and batch builders of the test suite.

The builders are plain functions (import them with ``from tests.conftest import ...``) so that parametrised tests
can call them with their own sizes and seeds; each draws from its own seeded generator, never the global one.
"""

from __future__ import annotations

import contextlib
import math
import sys

import pytest
import torch

F64 = torch.float64

#: torch.compile's tracer supports Python 3.11 from torch 2.1 on (torch 2.0 raises at the first compiled call there)
needs_compile = pytest.mark.skipif(
    sys.version_info >= (3, 11) and torch.__version__ < "2.1",
    reason=f"torch.compile needs torch >= 2.1 on Python 3.11 (torch {torch.__version__})",
)


def _cpu_float16_kernels() -> bool:
    half = torch.ones(1, 2, dtype=torch.float16)
    try:
        half @ half.T
        half.clamp_min(1e-12)
    except RuntimeError:  # "addmm_impl_cpu_" / "clamp_min_scalar_cpu" not implemented for 'Half' (torch 2.0, 2.1)
        return False
    return True


#: float16 matrix products and clamps on a CPU (torch 2.0 and 2.1 have neither; PML's losses and our functional
#: API compute float16 input in float16)
needs_cpu_float16 = pytest.mark.skipif(
    not _cpu_float16_kernels(), reason=f"torch {torch.__version__} lacks float16 CPU kernels (matmul, clamp_min)"
)


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


def _copy_state(value):
    """A copy of a tensor, plain value, or list/tuple/dict of them; _SKIP for anything else (not compared)."""
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        items = [_copy_state(v) for v in value]
        return _SKIP if any(i is _SKIP for i in items) else (type(value).__name__, items)
    if isinstance(value, dict):
        items = {k: _copy_state(v) for k, v in value.items()}
        return _SKIP if any(i is _SKIP for i in items.values()) else ("dict", items)
    return _SKIP


_SKIP = object()


def _snapshot(obj) -> dict:
    """Every tensor (cloned), plain value and list/tuple/dict of them held by obj and, for a module, its submodules
    and state_dict."""
    mods = obj.named_modules() if isinstance(obj, torch.nn.Module) else [("", obj)]
    out = {}
    for prefix, m in mods:
        for key, value in vars(m).items():
            copied = _copy_state(value)
            if copied is not _SKIP:
                out[f"{prefix}.{key}"] = copied
    if isinstance(obj, torch.nn.Module):
        out.update({k: v.detach().clone() for k, v in obj.state_dict().items()})
    return out


def _same(a, b) -> bool:
    """Exactly equal: tensors of the same dtype, shape and values (NaN where the other has NaN)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.dtype != b.dtype or a.shape != b.shape:
            return False
        both_nan = torch.isnan(a) & torch.isnan(b) if a.is_floating_point() else torch.zeros_like(a, dtype=torch.bool)
        return bool(((a == b) | both_nan).all())
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) == 2 and isinstance(a[0], str):
        if a[0] != b[0]:
            return False
        if a[0] == "dict":
            return a[1].keys() == b[1].keys() and all(_same(a[1][k], b[1][k]) for k in a[1])
        return len(a[1]) == len(b[1]) and all(_same(x, y) for x, y in zip(a[1], b[1]))
    if isinstance(a, float) and isinstance(b, float) and a != a:
        return b != b
    return type(a) is type(b) and a == b


def _assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert _same(value, after[key]), key


@pytest.fixture
def rejects():
    """``rejects(call, exc, name, obj=None)``: ``call()`` raises ``exc`` whose message names the argument ``name``,
    and leaves ``obj`` (a module or any object) exactly as it was."""

    def check(call, exc, name, obj=None):
        before = None if obj is None else _snapshot(obj)
        with pytest.raises(exc) as info:
            call()
        assert name in str(info.value), f"the message {str(info.value)!r} does not name {name!r}"
        if obj is not None:
            _assert_same_state(before, _snapshot(obj))

    return check


@pytest.fixture
def unchanged():
    """``with unchanged(obj): ...``: obj (a module or any object) holds the same tensors and values afterwards."""

    @contextlib.contextmanager
    def guard(obj):
        before = _snapshot(obj)
        yield
        _assert_same_state(before, _snapshot(obj))

    return guard


def pytest_generate_tests(metafunc):
    """Tables of bad input: a test that asks for ``bad_construction`` runs once per row ``(id, call, exception,
    argument named)`` of its module's ``BAD_CONSTRUCTION``."""
    if "bad_construction" in metafunc.fixturenames:
        table = metafunc.module.BAD_CONSTRUCTION
        metafunc.parametrize("bad_construction", [row[1:] for row in table], ids=[row[0] for row in table])
