"""Progress bars that suit where the output goes: tqdm's bar on a terminal, plain lines in a log file or a pipe.

tqdm redraws its bar with carriage returns and, for stacked bars, cursor-movement escape codes; in a log file those
become one long line full of control characters. :func:`progress_bar` returns tqdm on a terminal and otherwise a
:class:`LineProgress`: the same interface, writing one ordinary line at the start, at most one every
``line_every`` seconds, and one at the end.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import tqdm

LINE_EVERY = 30.0  # seconds between two progress lines in a log file


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _Discard:
    def write(self, s: str) -> None:
        pass

    def flush(self) -> None:
        pass


class LineProgress(tqdm.tqdm):
    """tqdm that writes whole lines without control characters (for output that is not a terminal).

    Args:
        line_every: the least number of seconds between two lines (the first and the last are always written).
        Other arguments: as ``tqdm.tqdm`` (``position`` and ``dynamic_ncols`` are ignored: lines do not stack).
    """

    def __init__(self, *args: Any, line_every: float = LINE_EVERY, **kwargs: Any) -> None:
        self._line_every = float(line_every)
        self._last_line = -float("inf")
        self._last_n: float | None = None
        kwargs.pop("dynamic_ncols", None)
        kwargs["position"] = None
        kwargs["ncols"] = kwargs.get("ncols") or 100
        kwargs["ascii"] = True
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if self.disable or msg == "":
            return True
        now = time.monotonic()
        finished = self.total is not None and self.n >= self.total
        if self.n == self._last_n or (not finished and now - self._last_line < self._line_every):
            return True
        self._last_line, self._last_n = now, self.n
        self.fp.write(self.__str__().replace("\r", "") + "\n")
        self.fp.flush()
        return True

    def clear(self, nolock: bool = False) -> None:  # nothing drawn, nothing to clear
        pass

    def moveto(self, n: int) -> None:  # no cursor movement
        pass

    def close(self) -> None:
        if not self.disable and self.n != self._last_n and self.n > 0:
            self._last_line = -float("inf")
            self._last_n = None
            self.display()
        self.fp = _Discard()  # tqdm's own closing output (carriage returns) goes nowhere
        super().close()


def progress_bar(*args: Any, file: Any = None, **kwargs: Any) -> tqdm.tqdm:
    """A tqdm bar on a terminal (``file``, default stderr), a :class:`LineProgress` otherwise."""
    stream = sys.stderr if file is None else file
    if is_terminal(stream):
        return tqdm.tqdm(*args, file=stream, **kwargs)
    return LineProgress(*args, file=stream, **kwargs)
