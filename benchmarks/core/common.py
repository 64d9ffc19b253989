"""What the benchmark scripts share: atomic file writes (figures too), device resolution and a description of the
machine."""

from __future__ import annotations

import io
import os
import platform
import tempfile
from collections.abc import Iterable
from typing import Any

import torch


def atomic_write(path: str, data: str | bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a partial file.

    The data goes to a temporary file in the same folder, is flushed to disk, gets the mode an ordinary new file
    would get, and then replaces ``path`` in one ``os.replace``.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_png(fig: Any, path: str, dpi: int = 110) -> None:
    """Write the matplotlib figure ``fig`` as a PNG with :func:`atomic_write`, then close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def resolve_device(arg: str) -> torch.device:
    """``"auto"`` (CUDA when available, else the CPU) or an explicit torch device string.

    Raises ``ValueError`` naming ``--device`` for a malformed string or a CUDA device on a machine without one.
    """
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(arg)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"--device: {arg!r} is not a torch device (cpu, cuda, cuda:1, auto)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {arg}: CUDA is not available on this machine")
    return device


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model with the number of logical CPUs visible."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {os.cpu_count()} logical CPUs visible"


def environment_info(device: torch.device) -> dict[str, object]:
    """Versions and machine facts recorded beside every benchmark result."""
    import pytorch_metric_learning

    import pml_rll

    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "pytorch_metric_learning": pytorch_metric_learning.__version__,
        "pml_rll": getattr(pml_rll, "__version__", "?"),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }


def closest(name: str, choices: Iterable[object]) -> str | None:
    """The choice closest to ``name`` (difflib's ratio >= 0.6), or None."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(name: str, choices: Iterable[object]) -> str:
    """`` (did you mean 'x'?)`` with the closest of ``choices`` to ``name``, or ``""`` when none is close."""
    match = closest(name, choices)
    return f" (did you mean {match!r}?)" if match else ""
