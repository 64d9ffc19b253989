"""What the runner shows: the figure's axes and colours, spreads over one seed, progress lines in log files,
one-line argument errors with the closest name, a short --help."""

from __future__ import annotations

import io

import matplotlib
import pytest

from benchmarks.core.progress import LineProgress, progress_bar
from benchmarks.results import report
from benchmarks.run import main

matplotlib.use("Agg")


def _record(loss, family, seed, map_r, p1):
    curve = [
        {"epoch": e, "iteration": 10 * e, "mean_average_precision_at_r": map_r * e / 2, "precision_at_1": p1}
        for e in (0, 1, 2)
    ]
    return {
        "loss": loss,
        "family": family,
        "seed": seed,
        "metrics": {"mean_average_precision_at_r": map_r, "precision_at_1": p1},
        "untrained": {},
        "curve": curve,
        "seconds_per_iteration": 0.01,
    }


RECORDS = [
    _record("rll", "ours", 0, 0.52, 0.885),
    _record("rll", "ours", 1, 0.50, 0.889),
    _record("pml-rll", "pml", 0, 0.51, 0.889),
    _record("pml-rll", "pml", 1, 0.49, 0.887),
    _record("contrastive", "pml", 0, 0.40, 0.80),
]


def test_figure_axes_start_at_zero_and_each_loss_keeps_its_colour():
    import matplotlib.pyplot as plt

    fig = report.build_figure(RECORDS)
    bars_map, bars_p1, curves = fig.axes[:3]
    for ax in (bars_map, bars_p1, curves):
        assert ax.get_ylim()[0] == 0.0
    names = [t.get_text() for t in bars_map.get_xticklabels()]
    assert names == ["rll", "pml-rll", "contrastive"]
    bar_colour = {n: p.get_facecolor()[:3] for n, p in zip(names, bars_map.patches)}
    assert len(set(bar_colour.values())) == 3  # distinct
    for n, p in zip(names, bars_p1.patches):
        assert p.get_facecolor()[:3] == bar_colour[n]
    for line in curves.get_lines():
        assert matplotlib.colors.to_rgb(line.get_color()) == pytest.approx(bar_colour[line.get_label()])
    assert [p.get_hatch() for p in bars_map.patches] == ["//", None, None]  # ours hatched
    plt.close(fig)


def test_one_seed_has_no_spread():
    md = report.markdown_tables(RECORDS)
    assert "| contrastive | pml | 1 | 80.00 ± n/a |" in md and "| 40.00 ± n/a |" in md
    assert "| rll | ours | 2 | 88.70 ± 0.28 |" in md and "| +12.00 ± n/a |" in md
    assert report._fmt((0.4, 0.0, 1)) == "40.00 ± n/a" and report._fmt((0.4, 0.01, 2)) == "40.00 ± 1.00"


def test_progress_in_a_log_file_is_plain_lines():
    buf = io.StringIO()
    bar = progress_bar(total=5, desc="runs", file=buf, position=1, dynamic_ncols=True)
    assert isinstance(bar, LineProgress)
    for _ in range(5):
        bar.update(1)
        bar.write("a record line", file=buf)
    bar.close()
    text = buf.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0].startswith("runs:   0%") and lines[-1].startswith("runs: 100%")
    assert lines.count("a record line") == 5
    assert len([ln for ln in lines if ln.startswith("runs:")]) == 2  # the first and the last (30 s apart at most)


def test_argument_errors_are_one_line_with_the_closest_name(tmp_path, capsys):
    for argv, hint in (
        (["--dataset", "digit"], "did you mean 'digits'?"),
        (["--epcohs", "3"], "did you mean '--epochs'?"),
        (["--losses", "rl,tripplet"], "did you mean 'rll', 'triplet'?"),
        (["--set", "rll.Tnn=3"], "did you mean 'Tn'?"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv + ["--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and hint in err
        assert len(err.strip().splitlines()) == 1 and "usage:" not in err


def test_help_is_short_and_the_registry_is_in_list(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert len(text.splitlines()) < 140 and "--list" in text  # the options, one line or two each; no registry
    assert "namr-multi-similarity" not in text
    assert main(["--list"]) == 0
    assert "namr-multi-similarity" in capsys.readouterr().out


def test_printed_namr_settings_are_the_effective_ones():
    from benchmarks.execute.pipeline import RunConfig
    from benchmarks.losses.config import build_registry
    from benchmarks.run import _namr_retrieval_line
    from pml_rll.losses import NAMR_CONFIGS

    cfg = RunConfig("digits", "mlp", 8, 16, 4, 1, 1, 1e-3, 0.0, "constant", 0, 64)
    reg = build_registry(None, ["namr-rll.retrieval.blend=0.5"])
    n = NAMR_CONFIGS["rll"]["retrieval"]["num_candidates"]
    line = _namr_retrieval_line(reg, "namr-rll", 10, cfg)
    assert f"num_candidates={n}," in line and "blend=0.5," in line and "normalize_sample=True" in line
    assert "normalize_sample=True" in _namr_retrieval_line(reg, "namr-triplet", 10, cfg)  # PML's default distance


def test_figures_are_written_atomically_and_closed(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image
    import matplotlib.pyplot as plt

    from benchmarks.core.common import atomic_write_png

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = tmp_path / "f.png"
    path.write_bytes(b"old")
    atomic_write_png(fig, str(path))
    assert fig.number not in plt.get_fignums()  # closed: a long sweep does not keep its figures
    assert matplotlib.image.imread(str(path)).ndim == 3  # the whole new PNG replaced the old file
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]  # no temporary file left
