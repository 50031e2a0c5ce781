"""The paper's train steps compile for one and eight H100s from this host (launch/aot.py's path),
fit the GPU's memory, and the Rule 110 step launches at most a third of the kernels it did."""

import json
import os
import subprocess
import sys

import jaxlib
import pytest

from configs import depo as depo_configs
from configs import rule110 as rule110_configs
from sleep_jax.parallel import gpu_topology
from sleep_jax.parallel.compiled import array_bytes
from sleep_jax.train import aot

pytestmark = [
  pytest.mark.gpu_compile,
  pytest.mark.skipif(bool(gpu_topology.missing_toolchain()), reason="no CUDA plugin or ptxas"),
]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# rule110.py:paper at N=1, counted by these rules on tree 246cd66 (before the GPU work): 3,065
# kernels per step with jax 0.10.2 (Triton GEMMs off, gpu_topology.compiler_options) and 3,294
# with 0.11.2. The target is a third of that.
KERNELS_BEFORE = {"0.10": 3065, "0.11": 3294}
KERNEL_BUDGET = KERNELS_BEFORE[".".join(jaxlib.__version__.split(".")[:2])] // 3
H100_MEMORY = 84_942_979_072


def check_fits(result, devices):
  assert result["num_devices"] == devices and result["fits"]
  assert 0 < result["peak_memory_bytes_per_device"] <= result["device_memory_bytes"]
  assert result["spill_bytes"] == 0, result["triton_kernel_report"]
  assert result["loops_without_trip_count"] == 0  # every loop's kernels are counted


def assert_no_array_moved(result):
  """No device-to-device copy of an array: no loop plumbing, no layout changes (cuBLAS's
  accumulator copies and scalar counters are not counted, compiled.copies_of_arrays). The one
  kind allowed is a parameter of a few elements written through a temporary: on 8 GPUs XLA
  fuses a [2, 4] gate parameter's gradient (which reads its other elements) with its update,
  and so copies the 32-byte result into the donated buffer."""
  moved = [copy for copy in result["array_copies"] if array_bytes(copy.split(": ")[1]) > 1024]
  assert moved == [], result["array_copies"]


@pytest.mark.parametrize("topology, devices", [("h100", 1), ("h100-8", 8)])
def test_paper_rule110_step_compiles_fits_and_stays_within_the_kernel_budget(topology, devices):
  result = aot.compile_for_topology(rule110_configs.get_config("paper"), topology)
  check_fits(result, devices)
  assert result["kernels_per_step"] <= KERNEL_BUDGET, result["kernels_by_kind"]
  assert_no_array_moved(result)


@pytest.mark.parametrize("variant", ["paper", "paper_bf16"])
def test_four_passes_and_bfloat16_compile_with_no_array_copies(variant):
  config = rule110_configs.get_config(variant)
  config.sleep.passes = 4
  result = aot.compile_for_topology(config, "h100")
  check_fits(result, 1)
  assert_no_array_moved(result)
  assert result["dtype"] == config.model.dtype


@pytest.mark.parametrize(
  "variant, topology, devices",
  [("paper_fig3", "h100", 1), ("paper_fig3", "h100-8", 8), ("paper_fig3_bf16", "h100", 1)],
)
def test_paper_depo_step_compiles_with_triton_kernels_and_fits(variant, topology, devices):
  # Windows of 75 tokens are two 64-token chunks per call: the state walk runs in Triton.
  config = depo_configs.get_config(variant)
  result = aot.compile_for_topology(config, topology)
  check_fits(result, devices)
  assert result["triton_kernels"] > 0 and result["eval_triton_kernels"] > 0
  assert result["dtype"] == config.model.dtype


def test_h200s_on_two_hosts():
  result = aot.compile_for_topology(rule110_configs.get_config("paper"), "h200-2x8")
  assert (result["num_devices"], result["num_processes"]) == (16, 2)
  assert "H200" in result["device_kind"] and result["mesh"]["data"] == 16
  assert result["device_memory_bytes"] == 151_397_597_184 and result["fits"]


def test_the_largest_batch_search_stops_at_the_gpu_memory():
  # XLA:GPU compiles a program larger than the GPU: the search must compare peaks itself.
  largest = aot.largest_fitting_batch(
    rule110_configs.get_config("paper"), "h100", start_per_device=2**12, limit_per_device=2**16
  )
  assert 2**12 <= largest["per_device_batch"] < 2**16  # stopped at one that did not fit
  assert largest["peak_memory_bytes_per_device"] <= H100_MEMORY


def test_aot_cli_writes_the_gpu_table_and_json(tmp_path):
  out = tmp_path / "aot.json"
  run = subprocess.run(
    [
      sys.executable,
      "launch/aot.py",
      "--config=configs/depo.py:paper_fig3",
      "--topology=h100-8",
      f"--out={out}",
    ],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=900,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  row = json.loads(out.read_text())
  for key in ("topology", "num_devices", "num_processes", "mesh", "flops_per_step", "compile_s"):
    assert key in row
  assert row["triton_kernels"] > 0 and row["fits"] and row["kernels_per_step"] > 0
  assert "| h100-8 | 8 | 1 | 8x1x1 | 128 |" in run.stdout


def test_without_jax_platforms_the_error_names_the_variable():
  # On a host without a GPU the CUDA plugin registers only when JAX_PLATFORMS leaves CUDA out.
  env = {key: value for key, value in os.environ.items() if key != "JAX_PLATFORMS"}
  code = "from sleep_jax.parallel import gpu_topology; gpu_topology.gpu_devices('h100')"
  run = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )
  assert run.returncode != 0 and "JAX_PLATFORMS=cpu" in run.stderr, run.stderr[-2000:]
