# Targets: `make benchmark` (the main job), `make test`, `make lint` (ruff lint + format check, mypy, interrogate,
# the import contracts of lint-imports, the function length limit),
# `make docs` (the documentation site, mkdocs build --strict, into site/);
# `make verdict-convergence`, `make verdict`, `make verdict-export`: the tuned Omniglot study (docs/verdict.md).
# Each creates or reuses .venv from the pinned constraints file (torch and torchvision pinned together).
# `make test-compat` (`test-oldest` + `test-newest`): the library's tests on the oldest supported torch and on the
# newest one, each in its own environment (.venv-oldest, .venv-newest) from constraints-oldest.txt /
# constraints-newest.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= cpu,logging,vision,timm,bench,test,lint,postgres,docs
STAMP := $(VENV)/.installed

.PHONY: venv test lint docs benchmark clean-venv verdict-convergence verdict verdict-export test-compat test-oldest test-newest

# The verdict study (docs/verdict.md). Omniglot's archives in $(VERDICT_DATA); every run is kept in the store of
# $(VERDICT_OUT), so each `make verdict` continues where the last one stopped. VERDICT_SEGMENT: a duration for
# `timeout` (e.g. 3h) after which the runner stops cleanly and exports what is finished; 0 runs to the end.
VERDICT_DATA ?= $(PML_RLL_DATA)/omniglot
VERDICT_OUT ?= results/omniglot_verdict
VERDICT_EPOCHS ?= 20
VERDICT_JOBS ?= 2
VERDICT_SEGMENT ?= 0
VERDICT_DOCS ?= docs/results/omniglot_verdict
VERDICT_ARGS = --dataset omniglot --data-root $(VERDICT_DATA) --losses all --tune --trials 12 --folds 2 --seeds 5 \
	--epochs $(VERDICT_EPOCHS) --iterations-per-epoch 100 --eval-every 10 --jobs $(VERDICT_JOBS) --out $(VERDICT_OUT)
CONVERGENCE_OUT ?= results/omniglot_convergence
CONVERGENCE_LOSSES ?= rll,rll-autograd,pml-rll,multi-similarity,circle,margin,ntxent
CONVERGENCE_EPOCHS ?= 40

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
	$(VENV)/bin/lint-imports
	$(PY) .ci/function_length.py

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

benchmark: $(STAMP)
	$(PY) -m benchmarks.run $(ARGS)

clean-venv:
	rm -rf $(VENV) .venv-oldest .venv-newest

# validation learning curves of the strongest losses (defaults, both folds, one seed), then where they flatten
verdict-convergence: $(STAMP)
	timeout $(VERDICT_SEGMENT) $(PY) -m benchmarks.run --dataset omniglot --data-root $(VERDICT_DATA) \
		--losses $(CONVERGENCE_LOSSES) --tune --trials 1 --folds 2 --seeds 1 --epochs $(CONVERGENCE_EPOCHS) \
		--iterations-per-epoch 100 --eval-every 5 --jobs $(VERDICT_JOBS) --out $(CONVERGENCE_OUT); rc=$$?; \
	if [ $$rc -eq 124 ] || [ $$rc -eq 130 ]; then echo "stopped: 'make verdict-convergence' continues"; exit 0; fi; \
	test $$rc -eq 0 && $(PY) -m benchmarks.convergence $(CONVERGENCE_OUT) --losses $(CONVERGENCE_LOSSES) --curves

# the study, in resumable segments
verdict: $(STAMP)
	timeout $(VERDICT_SEGMENT) $(PY) -m benchmarks.run $(VERDICT_ARGS); rc=$$?; \
	if [ $$rc -eq 124 ] || [ $$rc -eq 130 ]; then echo "segment over: 'make verdict' continues from the store"; exit 0; fi; \
	exit $$rc

# the finished study's exports, into the documentation
verdict-export:
	mkdir -p $(VERDICT_DOCS)
	cd $(VERDICT_OUT) && cp results.md results.csv results_untuned.csv results.jsonl results.png trials.csv \
		verdict.md verdict.csv verdict.png $(CURDIR)/$(VERDICT_DOCS)/

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
