# Thin aliases of the README commands (CI runs the same test command via .ci/run).
PYTHON ?= python
WORKDIR ?= runs/rule110_cpu

.PHONY: install run test test-all test-tpu-compile bench bench-gpu aot-table reproduce

install:
	$(PYTHON) -m pip install -e ".[test]"

run:
	$(PYTHON) launch/main.py --config=configs/rule110.py:cpu --workdir=$(WORKDIR)

test:
	$(PYTHON) -m pytest -m "not slow and not gpu and not tpu and not tpu_compile" -n 2 -q

test-all:
	$(PYTHON) -m pytest -m "not gpu and not tpu and not tpu_compile" -n 2 -q

# Compile for TPU topologies on this host (needs libtpu: pip install -e ".[tpu]"); one process.
test-tpu-compile:
	$(PYTHON) -m pytest -m tpu_compile -q

# The README's TPU table: paper configs on v5e-8, v5p-32 and 2 x v5e-16, and the largest v5e batch.
aot-table:
	$(PYTHON) bench/aot_table.py --largest_batch --out docs/results/aot/aot.json

bench:
	$(PYTHON) bench/gated_delta.py
	$(PYTHON) bench/train_step.py

# On a GPU host: the accelerator tests and the kernel benchmark at the GPU shape (with fla).
bench-gpu:
	$(PYTHON) -m pytest -m gpu -q tests/ops
	$(PYTHON) bench/gated_delta.py --shape gpu

# The two CPU sweeps (about an hour each on 2 cores), then their reports under docs/results/.
reproduce:
	$(PYTHON) launch/sweep.py --config=configs/sweeps/rule110_cpu.py --sweep_dir=runs/sweeps/rule110_cpu
	$(PYTHON) launch/sweep.py --config=configs/sweeps/depo_cpu.py --sweep_dir=runs/sweeps/depo_cpu
	$(PYTHON) -m sleep_jax.eval.report runs/sweeps/rule110_cpu --out docs/results/rule110_cpu
	$(PYTHON) -m sleep_jax.eval.report runs/sweeps/depo_cpu --out docs/results/depo_cpu
