"""The few torch functions whose spelling changed across the supported torch releases (see the README's install
section), each behind one name that works on all of them: the newest spelling where torch has it, the older one
otherwise. Resolved once, at import; nothing here costs anything per call on a recent torch beyond the call itself.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

__all__ = ["is_autocast_enabled", "is_compiling"]


def _dynamo_is_compiling() -> bool:
    # torch.compile imports torch._dynamo: while it was never imported nothing can be tracing, and this module does
    # not import it (a costly import) on behalf of users who never compile.
    dynamo = sys.modules.get("torch._dynamo")
    return dynamo is not None and bool(dynamo.is_compiling())


def _resolve_is_compiling() -> Callable[[], bool]:
    compiler = getattr(torch, "compiler", None)
    native = getattr(compiler, "is_compiling", None)
    if native is not None:
        return native  # type: ignore[no-any-return]
    return _dynamo_is_compiling


is_compiling: Callable[[], bool] = _resolve_is_compiling()
"""Whether ``torch.compile`` is tracing the current call: ``torch.compiler.is_compiling`` where torch has it,
``torch._dynamo.is_compiling`` before (False while torch._dynamo was never imported)."""


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
