# Two commands do all the set-up on a fresh machine: `make test` (and, later, `make demo`).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test bench-cpu lint

setup: $(VENV)/.installed

# torch first, as the CPU build 2.13.0 when the venv has none: a bare `torch` requirement would
# pull a multi-GB CUDA build.
$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: setup
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests

bench-cpu: setup
	$(PY) scripts/bench_kernels.py --preset cpu --out bench_out/cpu

lint: setup
	$(VENV)/bin/ruff check .
