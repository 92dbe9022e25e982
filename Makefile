# Quick start: `make demo` (synthetic CPU demo, a few minutes) and `make test` (the test suite).
# Each creates .venv with Python 3.11 (python3) and installs requirements.txt pinned by
# constraints.txt (the CPU torch 2.13.0 build) the first time.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test venv clean kd-bench kd-bench-quick kd-bench-converged
venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch
	$(PY) -m pip install --quiet -c constraints.txt -r requirements.txt -r requirements-test.txt
	touch $@

demo: venv
	$(PY) -m tools.demo

test: venv
	$(PY) -m pytest -q tests

# What each distillation method buys, on a synthetic task with a capacity gap (docs/RESULTS.md):
# converged networks (README's headline rows), the short schedule, its 1-seed smoke test.
kd-bench-converged: venv
	$(PY) bench/kd_quality.py --regime converged

kd-bench: venv
	$(PY) bench/kd_quality.py --regime short

kd-bench-quick: venv
	$(PY) bench/kd_quality.py --quick

clean:
	rm -rf $(VENV) work_dirs/demo work_dirs/kd_bench
