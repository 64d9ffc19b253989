"""The compatibility helpers give torch's own answer on every supported torch release (CI runs them on the oldest
and on the pinned one)."""

from __future__ import annotations

import re

import pytest
import torch

from pml_rll.utils import compat
from tests.conftest import needs_compile


def test_is_compiling_is_torchs_own_function():
    native = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    assert compat.is_compiling is (native if native is not None else torch._utils.is_compiling)


def test_is_compiling_is_false_in_eager_mode():
    assert compat.is_compiling() is False


@needs_compile
def test_is_compiling_is_true_while_torch_compile_traces():
    import torch._dynamo

    def f(x):
        return x + 1 if compat.is_compiling() else x - 1

    torch._dynamo.reset()
    x = torch.zeros(3)
    try:
        assert torch.equal(torch.compile(f, backend="eager", fullgraph=True)(x), x + 1)
    finally:
        torch._dynamo.reset()
    assert torch.equal(f(x), x - 1)  # eager again


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_is_autocast_enabled_follows_the_autocast_state_of_each_device_type(device_type):
    assert compat.is_autocast_enabled(device_type) is False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compat.is_autocast_enabled(device_type) is (device_type == "cpu")
        with torch.autocast("cpu", enabled=False):
            assert compat.is_autocast_enabled(device_type) is False
    assert compat.is_autocast_enabled(device_type) is False


def test_is_autocast_enabled_uses_the_device_type_argument_where_torch_takes_it():
    try:
        torch.is_autocast_enabled("cpu")
    except TypeError:  # older torch: no argument, CUDA's state
        assert compat._AUTOCAST_TAKES_DEVICE_TYPE is False
    else:
        assert compat._AUTOCAST_TAKES_DEVICE_TYPE is True


def test_is_autocast_enabled_on_a_device_type_without_autocast_query_is_false():
    assert compat._autocast_enabled_by_name("no-such-device") is False


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_aminmax_gives_the_extremes_in_every_floating_dtype(dtype):
    t = torch.tensor([[0.5, -2.0, 3.0], [1.0, 0.25, -0.75]], dtype=dtype)
    low, high = compat.aminmax(t)
    assert (low.item(), high.item()) == (-2.0, 3.0)
    t[1, 1] = float("nan")  # NaN propagates to the extremes (what the finiteness check relies on)
    assert all(torch.isnan(v).item() for v in compat.aminmax(t))
    t[1, 1] = float("inf")
    assert compat.aminmax(t)[1].item() == float("inf")


def test_aminmax_takes_the_float32_detour_only_where_torch_lacks_the_kernel():
    for dtype in (torch.float16, torch.bfloat16):
        try:
            torch.aminmax(torch.zeros(2, dtype=dtype))
        except RuntimeError:
            assert dtype in compat._CPU_AMINMAX_MISSING
        else:
            assert dtype not in compat._CPU_AMINMAX_MISSING
    assert torch.float32 not in compat._CPU_AMINMAX_MISSING


@pytest.mark.parametrize("version", ["1.13.1", "1.13.1+cu117", "1.9.0"])
def test_a_torch_older_than_the_floor_is_refused_with_its_version(version):
    with pytest.raises(ImportError, match=rf"torch >= 2\.0, but torch {re.escape(version)} is installed"):
        compat.check_torch_version(version)


@pytest.mark.parametrize("version", ["2.0.0", "2.0.0+cu117", "2.1.0a0", "2.15.0", torch.__version__])
def test_a_supported_torch_is_accepted(version):
    compat.check_torch_version(version)
