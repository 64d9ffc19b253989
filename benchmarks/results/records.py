"""The runner's records as JSON lines: ``results.jsonl``, the export that :mod:`~benchmarks.results.report` writes
and that the readers of finished results (:mod:`~benchmarks.results.stats`, ``headline``, ``namr_diagnose``) load."""

from __future__ import annotations

import json
import os

import numpy as np

from ..core.common import atomic_write


def write_jsonl(path: str, records: list[dict]) -> None:
    """Write every record as one JSON line, atomically (the export of the store)."""
    atomic_write(path, "".join(json.dumps(r, sort_keys=True, default=_json_default) + "\n" for r in records))


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def load_jsonl(path: str) -> list[dict]:
    """The records of a JSON lines export (none when the file does not exist)."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out
