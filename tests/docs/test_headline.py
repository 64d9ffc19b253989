"""The README's headline table is the one generated from its export (benchmarks/headline.py)."""

from __future__ import annotations

import pytest

from benchmarks.results.headline import EXPORT, OUTPUT, headline_table, main, readme_table
from benchmarks.results.report import load_jsonl
from tests.docs.snippets import ROOT


def _record(loss, family, variant, seed, map_r, p1):
    return {
        "loss": loss,
        "family": family,
        "variant": variant,
        "seed": seed,
        "metrics": {"mean_average_precision_at_r": map_r, "precision_at_1": p1},
    }


def test_readme_table_equals_the_one_generated_from_the_export():
    generated = headline_table(load_jsonl(str(ROOT / EXPORT)))
    assert readme_table((ROOT / "README.md").read_text(encoding="utf-8")) == generated
    assert (ROOT / OUTPUT).read_text(encoding="utf-8") == generated  # the copy the results page includes


def test_the_export_has_every_loss_of_the_table_at_three_paired_seeds():
    records = load_jsonl(str(ROOT / EXPORT))
    table = headline_table(records)
    rows = [line.split(" | ")[0].strip("| ") for line in table.splitlines()[2:]]
    assert rows == ["rll", "namr-triplet", "multi-similarity", "contrastive", "triplet"]
    for loss in rows:
        for variant in ("tuned", "untuned"):
            seeds = sorted(int(r["seed"]) for r in records if r["loss"] == loss and r["variant"] == variant)
            assert seeds == [0, 1, 2], (loss, variant, seeds)


def test_headline_table_by_hand():
    # tuned 0.50, 0.60 against untuned 0.40, 0.70: means 55.00 and 55.00, per-seed differences +10 and -10 points
    records = [
        _record("ours-a", "ours", "tuned", 0, 0.50, 0.9),
        _record("ours-a", "ours", "tuned", 1, 0.60, 0.9),
        _record("ours-a", "ours", "untuned", 0, 0.40, 0.8),
        _record("ours-a", "ours", "untuned", 1, 0.70, 0.8),
        _record("pml-b", "pml", "tuned", 0, 0.30, 0.5),
        _record("pml-b", "pml", "untuned", 0, 0.30, 0.5),
        _record("pml-b", "pml", "untuned", 1, 0.99, 0.99),  # no tuned run at seed 1: not paired, not shown
    ]
    lines = headline_table(records).splitlines()
    assert lines[2] == (
        "| ours-a | ours | 55.00 ± 7.07 | 55.00 ± 21.21 | +0.00 ± 14.14 | 90.00 ± 0.00 | 80.00 ± 0.00 | +10.00 ± 0.00 |"
    )
    assert lines[3] == (  # one seed: no spread
        "| pml-b | PML | 30.00 ± n/a | 30.00 ± n/a | +0.00 ± n/a | 50.00 ± n/a | 50.00 ± n/a | +0.00 ± n/a |"
    )
    assert len(lines) == 4


def test_no_tuned_runs_and_missing_markers_are_errors():
    with pytest.raises(ValueError, match="records: no tuned runs"):
        headline_table([_record("a", "ours", "untuned", 0, 0.5, 0.5)])
    with pytest.raises(ValueError, match="markers"):
        readme_table("# a README without the table\n")


def test_check_reports_a_stale_copy(tmp_path, capsys):
    readme = tmp_path / "README.md"
    out = tmp_path / "headline.md"
    assert main(["--export", str(ROOT / EXPORT), "--out", str(out)]) == 0
    table = out.read_text(encoding="utf-8")
    readme.write_text(f"intro\n<!-- headline-table:start -->\n{table}<!-- headline-table:end -->\n", encoding="utf-8")
    args = ["--export", str(ROOT / EXPORT), "--out", str(out), "--readme", str(readme), "--check"]
    assert main(args) == 0
    readme.write_text(readme.read_text(encoding="utf-8").replace("44.82", "44.83"), encoding="utf-8")
    assert main(args) == 1
    assert "--readme" in capsys.readouterr().out
