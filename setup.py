"""Packaging. Metadata, dependencies and console commands are in setup.cfg; this file lists the packages: pml_rll,
and the benchmark runner's folder ``benchmarks/`` installed under the project's own name ``pml_rll_bench`` (its
modules import each other relatively, so both names work: ``python -m benchmarks.run`` in a checkout,
``pml-rll-bench`` or ``python -m pml_rll_bench.run`` after ``pip install``)."""

from __future__ import annotations

from setuptools import find_packages, setup

RUNNER = ["pml_rll_bench"] + [f"pml_rll_bench.{p}" for p in find_packages("benchmarks")]

setup(
    packages=find_packages(include=["pml_rll", "pml_rll.*"]) + RUNNER,
    package_dir={"pml_rll_bench": "benchmarks"},
    package_data={"pml_rll_bench": ["code_equivalence.txt", "examples/*.toml", "examples/*.py"]},
)
