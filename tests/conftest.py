from __future__ import annotations

import contextlib

import pytest
import torch


@pytest.fixture
def one_thread():
    # tiny tensors: thread hand-off costs more than it saves on a busy 2-core machine
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _snapshot(obj) -> dict:
    """Every tensor (cloned) and plain value held by obj and, for a module, its submodules and state_dict."""
    mods = obj.named_modules() if isinstance(obj, torch.nn.Module) else [("", obj)]
    out = {}
    for prefix, m in mods:
        for key, value in vars(m).items():
            if torch.is_tensor(value):
                out[f"{prefix}.{key}"] = value.detach().clone()
            elif isinstance(value, (bool, int, float, str, type(None))):
                out[f"{prefix}.{key}"] = value
    if isinstance(obj, torch.nn.Module):
        out.update({k: v.detach().clone() for k, v in obj.state_dict().items()})
    return out


def _assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        if torch.is_tensor(value):
            assert torch.equal(value, after[key]) or (
                value.shape == after[key].shape and bool(torch.isclose(value, after[key], equal_nan=True).all())
            ), key
        else:
            assert value == after[key] or (value != value and after[key] != after[key]), key


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
