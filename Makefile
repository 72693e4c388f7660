# Two commands for a fresh machine with Python 3.11:  make demo  |  make test
# Everything is installed into .venv (CPU TensorFlow by default; README "GPU installation" for CUDA).

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= all
SNAKEMAKE_ARGS ?=
# Two pytest workers (pytest-xdist): much of a test's time is a Snakemake job starting, a SLURM status poll or a
# subprocess importing TensorFlow, which leaves a core idle. tests/conftest.py keeps the tiny run on one worker
# and each file's fixtures on one worker. PYTEST_PARALLEL= runs the suite in one process.
PYTEST_PARALLEL ?= -n 2 --dist loadgroup

.PHONY: demo test test-quick test-slow lint bench bench-demo bench-real report clean install

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (set PYTHON=/path/to/python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The stamp depends on pyproject.toml, so a changed dependency list reinstalls.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[tf,workflow,test]"
	touch $@

install: $(VENV)/.installed

demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --cores $(CORES) --resources gpu=1 --configfile config/config.yaml $(SNAKEMAKE_ARGS)

# The reference epoch (mammoseg.timing) is measured first, so the suite's time is also given in reference epochs.
test: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m mammoseg.timing --json > $(VENV)/reference-epoch.json
	PATH="$(CURDIR)/$(BIN):$$PATH" MAMMOSEG_REFERENCE_EPOCH="$(CURDIR)/$(VENV)/reference-epoch.json" \
	$(BIN)/python -m pytest $(PYTEST_PARALLEL) $(PYTEST_ARGS)

test-quick: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "not slow and not slurm" $(PYTEST_PARALLEL) $(PYTEST_ARGS)

# Snakemake's own lint of the rules, their format (snakefmt) and the Python's (ruff); configured in pyproject.toml.
lint: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --lint --configfile config/config.yaml
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/ruff check .

bench: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/run.py

# The demo over 5 seeds: its goals and its time in reference epochs (benchmarks/demo.py).
bench-demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/demo.py $(BENCH_DEMO_ARGS)

# The workflow on real mammograms (config/mias-dev.yaml; data: $$MAMMOSEG_MIAS_DEV or ../shared/data/mias-dev,
# skipped with a message when absent): out-of-fold FROC, CPM, Dice, false positives per normal image, wall time.
bench-real: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/real.py $(BENCH_REAL_ARGS)

report: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --configfile config/config.yaml --report report.html

clean:
	rm -rf results .snakemake report.html
