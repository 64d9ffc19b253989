# Targets: `make benchmark` (the main job), `make test`, `make lint` (ruff lint + format check, mypy, interrogate),
# `make docs` (the documentation site, mkdocs build --strict, into site/).
# Each creates or reuses .venv from the pinned constraints file (torch and torchvision pinned together).
# `make test-compat` (`test-oldest` + `test-newest`): the library's tests on the oldest supported torch and on the
# newest one, each in its own environment (.venv-oldest, .venv-newest) from constraints-oldest.txt /
# constraints-newest.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= cpu,logging,vision,bench,test,lint,postgres,docs
STAMP := $(VENV)/.installed

.PHONY: venv test lint docs benchmark clean-venv test-compat test-oldest test-newest

venv: $(STAMP)

$(STAMP): constraints.txt setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -c constraints.txt torch==2.14.1 torchvision==0.29.1 -e ".[$(EXTRAS)]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests -ra

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) -m interrogate pml_rll

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

benchmark: $(STAMP)
	$(PY) -m benchmarks.run $(ARGS)

clean-venv:
	rm -rf $(VENV) .venv-oldest .venv-newest

# The library and its tests only (the benchmark runner and the documentation checks need the pinned stack: the
# `bench` and `docs` extras). The constraints file is given as PIP_CONSTRAINT, so it replaces any machine-wide pip
# constraint instead of adding to it.
LIBRARY_TESTS := tests --ignore=tests/benchmarks --ignore=tests/docs

.venv-%/.installed: constraints-%.txt setup.cfg pyproject.toml
	test -x .venv-$*/bin/python || $(PYTHON) -m venv .venv-$*
	PIP_CONSTRAINT=constraints-$*.txt .venv-$*/bin/python -m pip install --disable-pip-version-check -q torch -e ".[test]"
	touch $@

test-oldest: .venv-oldest/.installed
	.venv-oldest/bin/python -m pytest $(LIBRARY_TESTS) -ra

test-newest: .venv-newest/.installed
	.venv-newest/bin/python -m pytest $(LIBRARY_TESTS) -ra

test-compat: test-oldest test-newest
