"""``python -m benchmarks.stats``: the command of :mod:`benchmarks.results.stats`.

Paired differences with 95% confidence intervals and verdicts, from the runner's records.
"""

from __future__ import annotations

import sys

from .results.stats import main

if __name__ == "__main__":
    sys.exit(main())
