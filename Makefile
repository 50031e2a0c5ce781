# Thin aliases of the README commands (CI runs the same test command via .ci/run).
PYTHON ?= python
SWEEP_DIR ?= runs/first_look

.PHONY: install install-xm install-gpu-compile run test test-integration test-multiprocess lint format test-all test-tpu-compile test-gpu-compile bench bench-gpu gpu-check aot-table reproduce fuzz

install:
	$(PYTHON) -m pip install -e ".[test]"

# XManager (launch/xm_launch.py submits with it; its tests build its real objects; CI installs it).
install-xm:
	$(PYTHON) -m pip install -e ".[xm]"

# The README's first command: the sleeping hybrid beside the plain one, then a side-by-side table.
run:
	$(PYTHON) launch/sweep.py --config=configs/sweeps/first_look.py --sweep_dir=$(SWEEP_DIR)

test:
	$(PYTHON) -m pytest -m "not slow and not integration and not gpu and not tpu and not tpu_compile and not gpu_compile" -n 2 -q

# End-to-end runs (real processes, the training loop on disk, the 8-device mesh); CI runs them.
test-integration:
	$(PYTHON) -m pytest -m integration -n 2 -q

# Two-process jobs on this host beside a CPU-burning process (clean shutdown, SIGTERM, resume).
test-multiprocess:
	$(PYTHON) -m pytest -m slow -q tests/launch/test_two_process_shutdown.py

# Lint and format check (ruff, configured in ruff.toml); `make format` rewrites in place.
lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

test-all:
	$(PYTHON) -m pytest -m "not gpu and not tpu and not tpu_compile and not gpu_compile" -n 2 -q

# Compile for TPU topologies on this host (needs libtpu: pip install -e ".[tpu]"); one process.
test-tpu-compile:
	$(PYTHON) -m pytest -m tpu_compile -q

# Compile for H100/H200 on this host (no GPU): the CUDA plugin of the installed jax and ptxas
# (~1.2 GB), then the kernels' and the paper steps' compile tests; one process.
install-gpu-compile:
	$(PYTHON) -m pip install "jax-cuda12-plugin==$$($(PYTHON) -c 'import jax; print(jax.__version__)')" nvidia-cuda-nvcc-cu12

test-gpu-compile:
	$(PYTHON) -m pytest -m gpu_compile -q

# The README's TPU table: paper configs on v5e-8, v5p-32 and 2 x v5e-16, and the largest v5e batch.
aot-table:
	$(PYTHON) bench/aot_table.py --largest_batch --out docs/results/aot/aot.json

bench:
	$(PYTHON) bench/gated_delta.py
	$(PYTHON) bench/train_step.py

# On a GPU host: the accelerator tests and the kernel benchmark at the GPU shape (with fla).
bench-gpu:
	JAX_PLATFORMS=cuda $(PYTHON) -m pytest -m gpu -q tests/ops
	$(PYTHON) bench/gated_delta.py --shape gpu

# On one H100/H200, about 9 minutes: the GPU tests, the kernel table (with fla), the paper's
# train step at N = 1, 2, 4 (float32; bfloat16 at N = 1, 4) and N=1 beside N=4 at depth; JSON
# and report.md in docs/results/gpu/.
gpu-check:
	$(PYTHON) bench/gpu_check.py --out docs/results/gpu

# The two CPU sweeps (about an hour each on 2 cores), then their reports under docs/results/.
reproduce:
	$(PYTHON) launch/sweep.py --config=configs/sweeps/rule110_cpu.py --sweep_dir=runs/sweeps/rule110_cpu
	$(PYTHON) launch/sweep.py --config=configs/sweeps/depo_cpu.py --sweep_dir=runs/sweeps/depo_cpu
	$(PYTHON) -m sleep_jax.experiments.report runs/sweeps/rule110_cpu --out docs/results/rule110_cpu
	$(PYTHON) -m sleep_jax.experiments.report runs/sweeps/depo_cpu --out docs/results/depo_cpu

# 1000 random cases of every gated delta rule impl against the float64 reference (~10 min).
fuzz:
	$(PYTHON) bench/fuzz_gated_delta.py
