# Thin aliases of the README commands (CI runs the same test command via .ci/run).
PYTHON ?= python
WORKDIR ?= runs/rule110_cpu

.PHONY: install run test test-all bench

install:
	$(PYTHON) -m pip install -e ".[test]"

run:
	$(PYTHON) launch/main.py --config=configs/rule110.py:cpu --workdir=$(WORKDIR)

test:
	$(PYTHON) -m pytest -m "not slow and not gpu and not tpu" -n 2 -q

test-all:
	$(PYTHON) -m pytest -m "not gpu and not tpu" -n 2 -q

bench:
	$(PYTHON) bench/gated_delta.py
	$(PYTHON) bench/train_step.py
