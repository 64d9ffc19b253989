"""``python -m benchmarks.namr_diagnose``: the command line (see :mod:`benchmarks.namr_diagnose.diagnose`)."""

from __future__ import annotations

import sys

from .diagnose import main

sys.exit(main())
