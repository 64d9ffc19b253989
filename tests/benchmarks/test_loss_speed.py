"""The loss speed benchmark script runs end to end on tiny configurations (no timing assertions)."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch

from benchmarks import loss_speed as ls
from benchmarks.loss_speed import cases, cli

TINY = ["--dim", "8", "--repeats", "2", "--warmup", "1", "--device", "cpu", "--threads", "1", "--no-progress"]


def _load(out):
    with open(os.path.join(out, ls.JSON_NAME)) as f:
        doc = json.load(f)
    with open(os.path.join(out, ls.MD_NAME)) as f:
        md = f.read()
    return doc, md


def test_end_to_end_tiny_with_memory(tmp_path):
    out = str(tmp_path / "out")
    ls.main("--batch-sizes 16 32 --losses pml-rll floor rll --memory-batch-sizes 32 --out".split() + [out] + TINY)
    doc, md = _load(out)
    cfg, res = doc["config"], doc["results"]
    assert cfg["batch_sizes"] == [16, 32] and cfg["dim"] == 8 and cfg["device"] == "cpu"
    assert cfg["torch_num_threads"] == 1 and doc["done_batch_sizes"] == [16, 32]
    for name in ("pml-rll", "floor"):
        for b in ("16", "32"):
            e = res[name][b]
            assert e["time_status"] == "ok", e
            assert len(e["times_ms"]) == 2 and e["median_ms"] > 0 and math.isfinite(e["median_ms"])
        assert res[name]["16"]["mem_status"] == "skipped"  # not in --memory-batch-sizes
        m = res[name]["32"]
        assert m["mem_status"] == "ok", m
        assert math.isfinite(m["peak_mib"]) and m["peak_mib"] >= 0
    # PML's RankedListLoss builds eight B x B matrices; the floor one: a visible difference even at B=32
    assert res["pml-rll"]["32"]["peak_mib"] > res["floor"]["32"]["peak_mib"]
    # ours: measured where importable, otherwise reported as unavailable with a reason (never a crash)
    ours = res["rll"]["32"]
    assert ours["time_status"] in ("ok", "unavailable")
    if ours["time_status"] == "unavailable":
        assert ours["time_reason"] and ours["mem_status"] == "unavailable"
    # Markdown: one row per loss, a column per batch size, the ratio section
    for label in (ls.CASES[n].label for n in ("pml-rll", "floor", "rll")):
        assert f"| {label} |" in md
    assert "| loss | B=16 | B=32 |" in md and "Peak memory" in md and "Ratios" in md
    assert f"{res['floor']['16']['median_ms']:.3g}" in md
    # PNG: a real image matplotlib can read back
    import matplotlib.image

    img = matplotlib.image.imread(os.path.join(out, ls.PNG_NAME))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]  # atomic writes leave no temp files


def test_max_batch_skip_unavailable_and_no_memory(tmp_path, monkeypatch):
    def broken(batch_size, workload, device):
        raise ls.Unavailable("not importable", "pml_rll.losses.Nothing: no such class")

    capped = dataclasses.replace(ls.CASES["floor"], max_batch=16, max_batch_reason="test cap")
    monkeypatch.setitem(ls.CASES, "floor", capped)  # one registry object, shared by the sweep and the renderer
    monkeypatch.setitem(ls.CASES, "broken", ls.SpeedCase("broken", "a broken loss", broken, note="raises Unavailable"))
    out = str(tmp_path / "out")
    ls.main("--batch-sizes 16 32 --losses floor broken contrastive --no-memory --no-plot --out".split() + [out] + TINY)
    doc, md = _load(out)
    res = doc["results"]
    assert res["floor"]["16"]["time_status"] == "ok"
    assert res["floor"]["32"]["time_status"] == "skipped" and "test cap" in res["floor"]["32"]["time_reason"]
    assert res["contrastive"]["32"]["time_status"] == "ok"
    assert {e["time_status"] for e in res["broken"].values()} == {"unavailable"}
    assert "skipped (test cap; max B 16)" in md and "unavailable (not importable)" in md
    assert "no such class" in md  # the underlying error is in the notes
    assert "Peak memory" not in md and not os.path.exists(os.path.join(out, ls.PNG_NAME))


def test_too_slow_loss_is_skipped_at_larger_batches(tmp_path):
    out = str(tmp_path / "out")
    ls.main(
        [
            "--batch-sizes",
            "8",
            "16",
            "--losses",
            "floor",
            "--memory-batch-sizes",
            "8",
            "--no-plot",
            "--max-step-s",
            "0",
            "--out",
            out,
        ]
        + TINY
    )
    res = _load(out)[0]["results"]["floor"]
    assert res["8"]["time_status"] == "skipped" and "B=8" in res["8"]["time_reason"]
    assert res["16"]["time_status"] == "skipped" and res["16"]["time_reason"] == res["8"]["time_reason"]
    assert res["8"]["mem_status"] == "ok"  # slowness does not cancel the single-step memory measurement


def test_resume_keeps_finished_batch_sizes(tmp_path):
    out = str(tmp_path / "out")
    args = ["--losses", "floor", "--no-memory", "--no-plot", "--out", out] + TINY
    ls.main(["--batch-sizes", "16"] + args)
    first = _load(out)[0]["results"]["floor"]["16"]["times_ms"]
    ls.main(["--batch-sizes", "16", "32", "--resume"] + args)
    doc = _load(out)[0]
    assert doc["done_batch_sizes"] == [16, 32]
    assert doc["results"]["floor"]["16"]["times_ms"] == first  # reused, not re-measured
    assert doc["results"]["floor"]["32"]["time_status"] == "ok"
    # different settings: not resumed, everything re-measured
    ls.main(["--batch-sizes", "16", "--resume"] + args + ["--repeats", "3"])  # the last --repeats wins
    doc = _load(out)[0]
    assert len(doc["results"]["floor"]["16"]["times_ms"]) == 3


def test_a_file_of_the_earlier_case_names_is_resumed(tmp_path, capsys):
    # loss_speed.json as written before the cases took the registry's names: the same run resumes from it
    out = str(tmp_path / "out")
    args = ["--losses", "pml-rll", "floor", "--no-memory", "--no-plot", "--out", out] + TINY
    ls.main(["--batch-sizes", "16"] + args)
    doc = _load(out)[0]
    doc["config"]["losses"] = ["pml_rll", "floor"]
    doc["results"] = {{"pml-rll": "pml_rll"}.get(n, n): per for n, per in doc["results"].items()}
    with open(os.path.join(out, ls.JSON_NAME), "w") as f:
        json.dump(doc, f)
    first = doc["results"]["pml_rll"]["16"]["times_ms"]
    capsys.readouterr()
    ls.main(["--batch-sizes", "16", "32", "--resume"] + args)
    assert "resuming: batch sizes [16]" in capsys.readouterr().err
    again = _load(out)[0]
    assert again["results"]["pml-rll"]["16"]["times_ms"] == first and "pml_rll" not in again["results"]
    assert again["results"]["pml-rll"]["32"]["time_status"] == "ok"


# The cases as they were named before they took the benchmark registry's names, with their labels: the same
# losses, measured the same way, under the registry's name (or one in its style for a loss it does not hold).
EARLIER_NAMES = {
    "rll_paper": ("rll", "ours RankedListLoss (paper grad)"),
    "rll_autograd": ("rll-autograd", "ours RankedListLoss (autograd)"),
    "pml_rll": ("pml-rll", "PML RankedListLoss"),
    "multi_similarity": ("multi-similarity", "PML MultiSimilarityLoss"),
    "contrastive": ("contrastive", "PML ContrastiveLoss"),
    "triplet_all": ("triplet", "PML Triplet + miner (all)"),
    "proxy_anchor": ("proxy-anchor", "PML ProxyAnchorLoss"),
    "multi_cluster_ranking": ("multi-cluster-ranking", "ours MultiClusterRankingLoss"),
    "namr_ms": ("namr-multi-similarity", "ours NAMRLoss(MultiSimilarity)"),
    "floor": ("floor", "floor: normalize + Gram"),
}


def test_every_case_keeps_its_loss_under_the_registry_name(capsys):
    from benchmarks.losses.registry import REGISTRY

    assert {new: label for new, label in EARLIER_NAMES.values()} == {n: c.label for n, c in ls.CASES.items()}
    for old, (new, _) in EARLIER_NAMES.items():
        assert cases.current_name(old) == new
        assert new in REGISTRY or new in ("multi-cluster-ranking", "floor")
    # the earlier names still select the same cases on the command line, with a note
    args = cli.parse_args(["--losses", "rll_paper", "rll", "namr_ms", "floor"])
    assert args.losses == ["rll", "namr-multi-similarity", "floor"]
    assert "rll_paper -> rll" in capsys.readouterr().err


def _fake(time_ms=None, mem=None):
    e = {}
    if time_ms is not None:
        e.update(time_status="ok", median_ms=time_ms, min_ms=time_ms / 2)
    if mem is not None:
        e.update(mem_status="ok", peak_mib=mem)
    return e


def test_compute_ratios_values_targets_and_missing():
    bs = [512, 1024, 2048, 4096]
    results = {
        "rll": {"512": _fake(4.0), "1024": _fake(10.0), "2048": _fake(70.0), "4096": _fake(1.0, mem=100.0)},
        "rll-autograd": {"512": _fake(8.0), "1024": _fake(12.0), "4096": _fake(mem=300.0)},
        "pml-rll": {"512": _fake(10.0), "1024": _fake(30.0), "4096": _fake(mem=1000.0)},
        "floor": {"1024": _fake(20.0), "2048": _fake(64.0)},
    }
    specs = ls.ratio_specs(ls.Workload(8))
    rows = {(r["title"], r["batch_size"]): r for r in ls.compute_ratios(results, bs, specs)}
    r = rows[("time ours (paper) / PML RankedListLoss", 512)]
    assert r["value"] == pytest.approx(0.4) and r["met"] is True and r["target"] == 0.5
    assert r["value_of_minima"] == pytest.approx(0.4)
    r = rows[("time ours (paper) / PML RankedListLoss", 1024)]
    assert r["value"] == pytest.approx(1 / 3) and r["met"] is True
    assert rows[("time ours (paper) / floor", 1024)]["value"] == pytest.approx(0.5)
    r = rows[("time ours (paper) / floor", 2048)]
    assert r["value"] == pytest.approx(70 / 64) and r["met"] is False
    r = rows[("peak memory ours (paper) / PML RankedListLoss", 4096)]
    assert r["value"] == pytest.approx(0.1) and r["met"] is True and "value_of_minima" not in r
    r = rows[("peak memory ours (autograd) / PML RankedListLoss", 4096)]
    assert r["value"] == pytest.approx(0.3) and r["met"] is None  # informational, no target
    r = rows[("time ours (autograd) / ours (paper)", 512)]
    assert r["value"] == pytest.approx(2.0) and r["met"] is False
    assert rows[("time ours (autograd) / ours (paper)", 1024)]["met"] is True
    r = rows[("time ours (autograd) / ours (paper)", 2048)]
    assert r["value"] is None and "rll-autograd time not measured" in r["reason"]
    # a batch size outside the run
    r = {(x["title"], x["batch_size"]): x for x in ls.compute_ratios(results, [512], specs)}[
        ("time ours (paper) / floor", 1024)
    ]
    assert r["value"] is None and "not in this run" in r["reason"]


@pytest.mark.parametrize(
    "bad", [["--batch-sizes", "10"], ["--batch-sizes", "4"], ["--losses", "nope"], ["--repeats", "0"]]
)
def test_bad_arguments_are_rejected(bad, tmp_path):
    with pytest.raises(SystemExit):
        ls.main(bad + ["--out", str(tmp_path)])


def test_reference_set_mode_tiny(tmp_path):
    """Cross-batch memory mode: the queries against a fixed reference set, with memory, ratios of that mode."""
    out = str(tmp_path / "out")
    names = ["rll", "contrastive", "multi-similarity", "floor", "pml-rll"]
    ls.main(["--batch-sizes", "16", "--ref-size", "64", "--losses", *names, "--no-plot", "--out", out] + TINY)
    doc, md = _load(out)
    res = doc["results"]
    assert doc["config"]["ref_size"] == 64
    for n in names[:4]:
        assert res[n]["16"]["time_status"] == "ok" and res[n]["16"]["mem_status"] == "ok", res[n]
    assert res["pml-rll"]["16"]["time_status"] == "unavailable"  # PML's RankedListLoss takes no ref_emb
    titles = {r["title"] for r in doc["ratios"]}
    assert "time ours (paper) / ContrastiveLoss" in titles and "time ours (paper) / PML RankedListLoss" not in titles
    assert "reference set of 64 items" in md


def test_input_kind_is_explicit():
    spec, w = ls.CASES["rll"], ls.Workload(16, "random")
    cpu = torch.device("cpu")
    a = cases.make_input(spec, 64, w, cpu)
    assert torch.equal(a, cases.make_input(spec, 64, w, cpu, kind="random"))
    hard = cases.make_input(spec, 64, w, cpu, kind="hard")
    assert not torch.equal(a, hard)
    assert torch.equal(hard, cases.make_input(spec, 64, ls.Workload(16, "hard"), cpu))  # nothing global
    ref_emb, ref_labels = cases.make_reference(64, ls.Workload(16, "hard", ref_size=128), cpu)
    assert ref_emb.shape == (128, 16) and not ref_emb.requires_grad and int(ref_labels.max()) == 31
