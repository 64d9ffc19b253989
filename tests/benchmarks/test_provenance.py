"""Code identity in the result key: an edited loss or library file is a new key, unchanged code the same key."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.core import provenance
from benchmarks.results import report
from benchmarks.run import main

TINY = ["--epochs", "1", "--iterations-per-epoch", "3", "--eval-every", "0", "--batch-size", "32", "--seeds", "1"]
LOSS_MODULE = '''
from pytorch_metric_learning.losses import ContrastiveLoss


class EditedLoss(ContrastiveLoss):
    """A user's loss whose forward the test edits between two runs."""

    def forward(self, *args, **kwargs):
        return SCALE * super().forward(*args, **kwargs)


SCALE = 1.0
'''
CONFIG = """
[losses.edited]
class = "{module}:EditedLoss"
kwargs = {{ neg_margin = 0.8 }}
"""


def _user_loss(tmp_path, module: str, scale: str) -> str:
    (tmp_path / f"{module}.py").write_text(LOSS_MODULE.replace("SCALE = 1.0", f"SCALE = {scale}"))
    cfg = tmp_path / "my.toml"
    cfg.write_text(CONFIG.format(module=module))
    return str(cfg)


def test_editing_a_user_loss_trains_again(tmp_path, capsys):
    out = str(tmp_path / "out")
    cfg = _user_loss(tmp_path, "edited_user_loss", "1.0")
    argv = ["--config", cfg, "--losses", "edited", "--out", out] + TINY
    assert main(argv) == 0
    first = report.load_jsonl(os.path.join(out, "results.jsonl"))
    assert main(argv) == 0  # unchanged code: reused
    assert "0 runs/trials made, 1 reused from the store" in capsys.readouterr().out

    _user_loss(tmp_path, "edited_user_loss", "0.0")  # same length, same second: the forward now returns 0
    assert main(argv) == 0
    assert "1 runs/trials made, 0 reused from the store" in capsys.readouterr().out
    second = report.load_jsonl(os.path.join(out, "results.jsonl"))
    assert first[0]["key"] != second[0]["key"]
    (c1,) = first[0]["code"]["classes"].values()
    (c2,) = second[0]["code"]["classes"].values()
    assert c1 != c2
    # the edited code is the code that trained: a zero loss leaves the network untrained (same seed, same batches)
    assert first[0]["iterations"] == second[0]["iterations"] == 3
    assert second[0]["metrics"] != first[0]["metrics"]
    md = open(os.path.join(out, "results.md")).read()
    assert c2 in md and second[0]["code"]["digests"]["pml_rll"] in md  # the report names the code of each row


def library_copy(tmp_path, monkeypatch) -> Path:
    """A copy of pml_rll that stands in for the installed tree (``provenance.package_folder`` names it)."""
    copy = tmp_path / "pml_rll"
    shutil.copytree(provenance.package_folder("pml_rll"), copy, ignore=shutil.ignore_patterns("__pycache__"))
    real = provenance.package_folder
    monkeypatch.setattr(provenance, "package_folder", lambda n: str(copy) if n == "pml_rll" else real(n))
    return copy


def run_then_edit(copy: Path, out: str, edit: str) -> list[str]:
    """Run the tiny contrastive command into ``out``, then append ``edit`` to a file of the library's copy; returns
    the command's arguments."""
    argv = ["--losses", "contrastive", "--out", out] + TINY
    assert main(argv) == 0
    path = copy / "losses" / "ranked_list_loss.py"
    path.write_text(path.read_text() + edit)
    return argv


def test_a_changed_library_file_changes_the_key(tmp_path, monkeypatch, capsys):
    # a copy of pml_rll stands in for the installed tree; editing one of its files is a new key for every run
    copy = library_copy(tmp_path, monkeypatch)
    before = provenance.code_digests()
    assert provenance.code_digests() == before  # stable
    argv = run_then_edit(copy, str(tmp_path / "out"), "\n# an edit\n")
    capsys.readouterr()
    after = provenance.code_digests()
    assert after["pml_rll"] != before["pml_rll"] and after["benchmarks"] == before["benchmarks"]
    assert main(argv) == 0
    assert "1 runs/trials made, 0 reused from the store" in capsys.readouterr().out


def test_digests_are_stable_across_processes_and_ignore_caches(tmp_path):
    here = provenance.code_digests()
    code = "import json; from benchmarks.core import provenance as p; print(json.dumps(p.code_digests()))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=os.getcwd())
    assert json.loads(other.stdout) == here
    tree = tmp_path / "pkg"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.py").write_text("x = 1\n")
    (tree / "sub" / "b.py").write_text("y = 2\n")
    d = provenance.tree_digest(str(tree))
    (tree / "__pycache__").mkdir()
    (tree / "__pycache__" / "a.cpython.pyc").write_bytes(b"\0")
    (tree / "notes.txt").write_text("not code")
    assert provenance.tree_digest(str(tree)) == d
    os.utime(tree / "a.py", (1, 1))
    assert provenance.tree_digest(str(tree)) == d  # content, not times
    (tree / "sub" / "b.py").write_text("y = 3\n")
    assert provenance.tree_digest(str(tree)) != d
    (tree / "sub" / "b.py").write_text("y = 2\n")
    assert provenance.tree_digest(str(tree)) == d
    (tree / "sub" / "b.py").rename(tree / "b.py")  # a moved file is other code
    assert provenance.tree_digest(str(tree)) != d


def test_class_digest_names_the_defining_file():
    import pml_rll.losses.ranked_list_loss as m

    assert provenance.class_digest("pml_rll.losses:RankedListLoss") == provenance.file_digest(m.__file__)
    assert provenance.class_digests([None, "pml_rll.losses:RankedListLoss"]).keys() == {"pml_rll.losses:RankedListLoss"}
