"""``python -m benchmarks.convergence``: the command of :mod:`benchmarks.results.convergence`.

Where the validation learning curves flatten: the budget at which a head-to-head ranks what the losses reach.
"""

from __future__ import annotations

import sys

from .results.convergence import main

if __name__ == "__main__":
    sys.exit(main())
