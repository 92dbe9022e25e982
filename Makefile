# Quick start: `make demo` (synthetic CPU demo, a few minutes) and `make test` (the test suite).
# Each creates .venv with Python 3.11 (python3) the first time and installs requirements-lock.txt:
# every package at the exact version README's numbers were made with. `make lock` regenerates the
# lock from requirements.txt + requirements-test.txt (torch pinned to its CPU build by
# constraints.txt) in a throwaway venv. GPU users install requirements.txt instead (README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements-lock.txt

.PHONY: demo test venv lock clean kd-bench kd-bench-quick kd-bench-converged
venv: $(VENV)/.installed

# pip first (the locked pip then installs the rest); the check fails the target when the venv
# still differs from the lock (another Python, a package installed by hand).
$(VENV)/.installed: $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $$(grep -E '^pip==' $(LOCK))
	$(PY) -m pip install --quiet -r $(LOCK)
	$(PY) -m tools.lock check --lock $(LOCK)
	touch $@

lock:
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	echo "[lock] resolving in the throwaway venv $$tmp/venv"; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install --quiet --upgrade pip; \
	"$$tmp/venv/bin/python" -m pip install --quiet -c constraints.txt torch; \
	"$$tmp/venv/bin/python" -m pip install --quiet -c constraints.txt -r requirements.txt \
		-r requirements-test.txt; \
	"$$tmp/venv/bin/python" -m pip check; \
	"$$tmp/venv/bin/python" -m tools.lock write --python "$$tmp/venv/bin/python" --output $(LOCK)

demo: venv
	$(PY) -m tools.demo

# KDFACE_REQUIRE_LOCK=1: tests/test_lock.py fails when the venv differs from the lock.
test: venv
	KDFACE_REQUIRE_LOCK=1 $(PY) -m pytest -q tests

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
