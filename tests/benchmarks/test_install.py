"""The package as pip installs it: pml_rll and the runner under the project's own name, with console commands that
work from any folder, and no pin on torch (a user's own torch build is kept)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCES = ("setup.py", "setup.cfg", "pyproject.toml", "README.md", "LICENSE", "pml_rll", "benchmarks")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        copy = shutil.copytree if os.path.isdir(os.path.join(ROOT, name)) else shutil.copy
        kw = {"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}
        copy(os.path.join(ROOT, name), str(src / name), **kw)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", "dist", "."]
    res = subprocess.run(cmd, cwd=src, capture_output=True, text=True)
    if res.returncode != 0 and "No module named" in res.stderr:
        pytest.skip(f"cannot build a wheel here: {res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0, res.stderr
    (path,) = glob.glob(str(src / "dist" / "*.whl"))
    return path


def test_wheel_holds_no_generic_top_level_name_and_no_torch_pin(wheel):
    import pml_rll

    z = zipfile.ZipFile(wheel)
    names = z.namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"pml_rll", "pml_rll_bench", f"pml_rll-{pml_rll.__version__}.dist-info"}
    assert "pml_rll_bench/run.py" in names and "pml_rll_bench/loss_speed/cli.py" in names
    assert "pml_rll_bench/examples/my_loss.toml" in names
    assert "pml_rll_bench/code_equivalence.txt" in names  # the declared equivalences of code digests
    meta = z.read(f"pml_rll-{pml_rll.__version__}.dist-info/METADATA").decode()
    torch_req = [line for line in meta.splitlines() if line.startswith("Requires-Dist: torch") and "extra" not in line]
    assert torch_req and all("==" not in line for line in torch_req)  # a range: the user's torch stays
    assert "License-File: LICENSE" in meta
    entry_points = z.read(f"pml_rll-{pml_rll.__version__}.dist-info/entry_points.txt").decode()
    assert "pml-rll-bench = pml_rll_bench.run:cli" in entry_points
    assert "pml-rll-speed = pml_rll_bench.loss_speed.cli:cli" in entry_points


def test_console_commands_work_from_the_root_folder(wheel, tmp_path):
    target = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), wheel]
    subprocess.run(cmd, check=True, capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(target))
    for command, expect in (("pml-rll-bench", "usage: pml-rll-bench"), ("pml-rll-speed", "usage: pml-rll-speed")):
        res = subprocess.run(
            [str(target / "bin" / command), "--help"], cwd="/", env=env, capture_output=True, text=True, timeout=300
        )
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith(expect)
    code = "import pml_rll, pml_rll_bench.run as r; print(pml_rll.__file__); print(r.__file__)"
    res = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True, check=True)
    assert all(line.startswith(str(target)) for line in res.stdout.split())
