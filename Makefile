# Targets: `make benchmark` (the main job), `make test`, `make lint` (ruff lint + format check, mypy, interrogate),
# `make docs` (the documentation site, mkdocs build --strict, into site/).
# Each creates or reuses .venv from the pinned constraints file (torch and torchvision pinned together).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= cpu,logging,vision,bench,test,lint,postgres,docs
STAMP := $(VENV)/.installed

.PHONY: venv test lint docs benchmark clean-venv

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
	rm -rf $(VENV)
