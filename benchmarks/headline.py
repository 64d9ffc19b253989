"""``python -m benchmarks.headline``: the command of :mod:`benchmarks.results.headline`.

The headline table of the README and of the documentation's results page, generated from a runner export.
"""

from __future__ import annotations

import sys

from .results.headline import main

if __name__ == "__main__":
    sys.exit(main())
