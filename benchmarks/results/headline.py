"""The headline table of the README and of the documentation's results page, generated from a runner export.

``python -m benchmarks.headline`` reads ``docs/results/omniglot_tuned/results.jsonl`` (written by
``python -m benchmarks.run ... --tune``) and writes ``docs/results/omniglot_tuned/headline.md``: per loss, the test
MAP@R and P@1 of the tuned and the untuned runs (mean ± std over the paired seeds, in %) and the paired difference
tuned − untuned (mean ± std of the per-seed differences, in points). ``--check`` compares instead: it exits with
status 1 when the written file or the README's copy (between ``<!-- headline-table:start -->`` and
``<!-- headline-table:end -->``) differs from the table generated now.
"""

from __future__ import annotations

import argparse
import os
import sys

from .report import PAIRED_METRICS, _fmt, _mean_std, load_jsonl, ordered_losses

EXPORT = os.path.join("docs", "results", "omniglot_tuned", "results.jsonl")
OUTPUT = os.path.join("docs", "results", "omniglot_tuned", "headline.md")
START, END = "<!-- headline-table:start -->", "<!-- headline-table:end -->"
FAMILY = {"ours": "ours", "pml": "PML", "user": "user"}


def headline_table(records: list[dict]) -> str:
    """The Markdown table of tuned against untuned test results, one row per loss, from the runner's records."""
    tuned = [r for r in records if r.get("variant") == "tuned"]
    untuned = {(r["loss"], int(r["seed"])): r for r in records if r.get("variant", "untuned") == "untuned"}
    if not tuned:
        raise ValueError("records: no tuned runs (the export of a --tune command is needed)")
    lines = [
        "| loss | family | tuned MAP@R | untuned MAP@R | Δ MAP@R | tuned P@1 | untuned P@1 | Δ P@1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for loss in ordered_losses(tuned):
        runs = [r for r in tuned if r["loss"] == loss]
        row = [loss, FAMILY.get(runs[0]["family"], runs[0]["family"])]
        for metric in PAIRED_METRICS:
            pairs = [
                (r["metrics"][metric], untuned[(loss, int(r["seed"]))]["metrics"][metric])
                for r in runs
                if (loss, int(r["seed"])) in untuned
            ]
            row += [
                _fmt(_mean_std([a for a, _ in pairs])),
                _fmt(_mean_std([b for _, b in pairs])),
                _fmt(_mean_std([a - b for a, b in pairs]), signed=True),
            ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def readme_table(readme_text: str) -> str:
    """The table between the headline markers of the README (the markers' lines excluded)."""
    if START not in readme_text or END not in readme_text:
        raise ValueError(f"README: the markers {START} and {END} are missing")
    inner = readme_text.split(START, 1)[1].split(END, 1)[0]
    return inner.strip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write (or with ``--check`` verify) the headline table; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--export", default=EXPORT, help="results.jsonl of the tuned Omniglot run")
    p.add_argument("--out", default=OUTPUT, help="the generated table (Markdown)")
    p.add_argument("--readme", default="README.md", help="README whose copy --check compares")
    p.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    args = p.parse_args(argv)
    if not os.path.exists(args.export):
        p.error(f"--export: {args.export} does not exist")
    table = headline_table(load_jsonl(args.export))
    if not args.check:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(table)
        print(f"wrote {args.out}")
        return 0
    status = 0
    for name, path, read in (("--out", args.out, lambda t: t), ("--readme", args.readme, readme_table)):
        with open(path, encoding="utf-8") as f:
            if read(f.read()) != table:
                print(f"{name}: the table in {path} differs from the one generated from {args.export}")
                status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
