"""The one-chunk kernels of the gated delta rule (sleep_jax/ops/gated_delta/pallas_gpu_chunk.py)
compile for an H100 from this host, fit Hopper's shared memory and spill nothing.

At the paper's sleep pass (B=512, a 24-token window, H=4, K=V=64), float32 and bfloat16: one
program holds the gradient of a loss over the outputs and the final state, from an initial
state, compiled through XLA:GPU, Pallas' Triton lowering, Triton and ptxas for sm_90a; ptxas'
report of each of the path's four kernels (one forward, three backward) must say 0 bytes of
spills. Their values and gradients are checked in the interpreter: tests/ops/test_gpu_chunk.py.
"""

import jax
import jax.numpy as jnp
import pytest

from sleep_jax.ops.gated_delta.pallas_gpu_chunk import gated_delta_rule_pallas_gpu_chunk
from sleep_jax.parallel import compiled, gpu_topology
from sleep_jax.train import aot

pytestmark = [
  pytest.mark.gpu_compile,
  pytest.mark.skipif(bool(gpu_topology.missing_toolchain()), reason="no CUDA plugin or ptxas"),
]

BATCH, TOKENS, HEADS, WIDTH = 512, 24, 4, 64
SHARED_MEMORY_LIMIT = 232_448  # Hopper's opt-in bytes per block (the target configs say so)
KERNELS = [
  "gated_delta_chunk_backward_output_keys",
  "gated_delta_chunk_backward_state_keys",
  "gated_delta_chunk_backward_values",
  "gated_delta_chunk_forward",
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_one_chunk_kernels_spill_nothing_at_the_papers_shape(dtype):
  devices = gpu_topology.gpu_devices("h100")
  sharding = jax.sharding.SingleDeviceSharding(devices[0])
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  inputs = (
    [spec((BATCH, TOKENS, HEADS, WIDTH), dtype)] * 3
    + [spec((BATCH, TOKENS, HEADS), jnp.float32)] * 2
    + [spec((BATCH, HEADS, WIDTH, WIDTH), jnp.float32)]
  )

  def loss(q, k, v, g, beta, state):
    out, final = gated_delta_rule_pallas_gpu_chunk(q, k, v, g, beta, initial_state=state)
    return out.astype(jnp.float32).sum() + final.sum()

  executable, report = aot.compile_with_triton_report(
    jax.jit(jax.value_and_grad(loss, argnums=range(6))), *inputs, devices=devices
  )
  assert (
    sorted(compiled.triton_kernel_names(executable.as_text())) == KERNELS
  )  # one launch forward, three back
  assert sorted(report) == KERNELS, report
  for name, row in report.items():
    assert row["spill_store_bytes"] == 0 and row["spill_load_bytes"] == 0, (name, row)
    assert row["shared_memory_bytes"] <= SHARED_MEMORY_LIMIT, (name, row)
