"""The few torch functions whose spelling changed across the supported torch releases (see the README's install
section), each behind one name that works on all of them: the newest spelling where torch has it, the older one
otherwise. Resolved once, at import; nothing here costs anything per call on a recent torch beyond the call itself.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["aminmax", "is_autocast_enabled", "is_compiling"]

#: The oldest torch release the package supports (setup.cfg's floor).
MIN_TORCH = "2.0"


def check_torch_version(version: str) -> None:
    """Raise an ``ImportError`` naming the installed and the needed release when ``version`` is older than
    :data:`MIN_TORCH` (pip enforces the floor; an environment assembled otherwise may still hold an older torch)."""
    if torch.torch_version.TorchVersion(version) < MIN_TORCH:
        raise ImportError(f"pml_rll needs torch >= {MIN_TORCH}, but torch {version} is installed; upgrade torch")


check_torch_version(torch.__version__)


def _resolve_is_compiling() -> Callable[[], bool]:
    # torch.compiler.is_compiling where torch has it; before, torch._utils.is_compiling, which torch.compile (its
    # dynamo tracer) replaces with True while it traces, and which needs no import of the tracer
    native = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if native is None:
        native = torch._utils.is_compiling
    return native  # type: ignore[no-any-return]


is_compiling: Callable[[], bool] = _resolve_is_compiling()
"""Whether ``torch.compile`` is tracing the current call (``torch.compiler.is_compiling``, or its older spelling)."""


_AUTOCAST_BY_TYPE = {
    "cpu": "is_autocast_cpu_enabled",
    "xpu": "is_autocast_xpu_enabled",
    "hpu": "is_autocast_hpu_enabled",
    "ipu": "is_autocast_ipu_enabled",
    "xla": "is_autocast_xla_enabled",
}


def _autocast_enabled_by_name(device_type: str) -> bool:
    # torch before the device-type argument: torch.is_autocast_enabled() is CUDA's, the others have one each
    if device_type == "cuda":
        return bool(torch.is_autocast_enabled())
    query = getattr(torch, _AUTOCAST_BY_TYPE.get(device_type, ""), None)
    return bool(query()) if query is not None else False


def _takes_device_type() -> bool:
    try:
        torch.is_autocast_enabled("cpu")  # type: ignore[call-arg]
    except TypeError:
        return False
    return True


_AUTOCAST_TAKES_DEVICE_TYPE = _takes_device_type()


def is_autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (``"cpu"``, ``"cuda"``, ...), as ``torch.is_autocast_enabled(
    device_type)`` on torch releases that take the argument; before, through the per-device functions."""
    if _AUTOCAST_TAKES_DEVICE_TYPE:
        return bool(torch.is_autocast_enabled(device_type))  # type: ignore[call-arg]
    return _autocast_enabled_by_name(device_type)


def _cpu_aminmax_lacks(dtype: torch.dtype) -> bool:
    try:
        torch.aminmax(torch.zeros(1, dtype=dtype))
    except RuntimeError:  # "aminmax_cpu" not implemented for 'Half' (torch 2.0, 2.1)
        return True
    return False


_CPU_AMINMAX_MISSING = frozenset(dt for dt in (torch.float16, torch.bfloat16) if _cpu_aminmax_lacks(dt))


def aminmax(t: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.aminmax(t)`` (the smallest and the largest value); in float32 for a half-precision tensor on a CPU
    where torch has no half-precision kernel for it (float16 on torch 2.0 and 2.1; the extremes are the same values)."""
    if t.dtype in _CPU_AMINMAX_MISSING and t.device.type == "cpu":
        t = t.float()
    low, high = torch.aminmax(t)
    return low, high
