"""The GPU kernels compile for H100 and H200 from this host, fit Hopper and spill nothing
(the gated delta rule's, and causal attention's over a window).

Each case compiles one program holding a kernel's forward and backward (the gradient of a loss
over the outputs and the final state, from an initial state) through XLA:GPU, Pallas' Triton
lowering, Triton and ptxas for sm_90a, then runs ptxas over the dumped PTX of every Triton
kernel for its report. A kernel over the shared-memory limit fails the compile itself
(RESOURCE_EXHAUSTED); a spill shows only in ptxas' report, which must say 0 bytes.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from sleep_jax.ops import causal_attention, gated_delta_rule
from sleep_jax.parallel import compiled, gpu_topology
from sleep_jax.train import aot

pytestmark = [
  pytest.mark.gpu_compile,
  pytest.mark.skipif(bool(gpu_topology.missing_toolchain()), reason="no CUDA plugin or ptxas"),
]

# 16 chunks of 64 tokens: the staged form launches its walk kernels too.
BATCH, TOKENS, HEADS = 2, 1024, 4
SHARED_MEMORY_LIMIT = 232_448  # Hopper's opt-in bytes per block (the target configs say so)


def _abstract_inputs(device, dtype, width):
  sharding = jax.sharding.SingleDeviceSharding(device)
  spec = functools.partial(jax.ShapeDtypeStruct, sharding=sharding)
  return (
    [spec((BATCH, TOKENS, HEADS, width), dtype)] * 3
    + [spec((BATCH, TOKENS, HEADS), jnp.float32)] * 2
    + [spec((BATCH, HEADS, width, width), jnp.float32)]
  )


def compile_and_report(gpu, impl, dtype, width):
  """(executable, ptxas' report of its Triton kernels) for a kernel's gradient."""

  def loss(q, k, v, g, beta, state):
    out, final = gated_delta_rule(q, k, v, g, beta, initial_state=state, impl=impl)
    return out.astype(jnp.float32).sum() + final.sum()

  devices = gpu_topology.gpu_devices(gpu)
  return aot.compile_with_triton_report(
    jax.jit(jax.value_and_grad(loss, argnums=range(6))),
    *_abstract_inputs(devices[0], dtype, width),
    devices=devices,
  )


CASES = [
  (gpu, impl, dtype, width)
  for gpu in ("h100", "h200")
  for impl in ("pallas", "pallas_staged", "auto")
  for dtype in (jnp.float32, jnp.bfloat16)
  for width in (64, 128)
  if gpu == "h100" or width == 128  # the H200 differs in memory only: its bench shape
]


@pytest.mark.parametrize(
  "gpu, impl, dtype, width",
  CASES,
  ids=[f"{g}-{i}-{jnp.dtype(d).name}-K=V={w}" for g, i, d, w in CASES],
)
def test_kernels_compile_within_shared_memory_and_spill_nothing(gpu, impl, dtype, width):
  executable, report = compile_and_report(gpu, impl, dtype, width)
  assert compiled.pallas_calls(executable.as_text()) >= 2, "a forward and a backward Triton kernel"
  assert report, "ptxas reported no Triton kernel"
  for name, row in report.items():
    assert row["spill_store_bytes"] == 0 and row["spill_load_bytes"] == 0, (name, row)
    assert row["shared_memory_bytes"] <= SHARED_MEMORY_LIMIT, (name, row)  # from the launch


ATTENTION_CASES = [
  # (batch, tokens, heads, key/value heads, width, dtype): the paper's window, the longest
  # window a program takes in each dtype, grouped-query heads.
  (512, 24, 4, 4, 64, jnp.float32),
  (512, 24, 4, 4, 64, jnp.bfloat16),
  (8, 64, 8, 8, 64, jnp.float32),
  (8, 64, 8, 8, 128, jnp.bfloat16),
  (8, 64, 8, 2, 64, jnp.float32),
]


@pytest.mark.parametrize(
  "shape", ATTENTION_CASES, ids=[f"{c[:5]}-{jnp.dtype(c[5]).name}" for c in ATTENTION_CASES]
)
def test_attention_kernels_compile_and_spill_nothing(shape):
  batch, tokens, heads, kv_heads, width, dtype = shape
  devices = gpu_topology.gpu_devices("h100")
  sharding = jax.sharding.SingleDeviceSharding(devices[0])
  spec = lambda h: jax.ShapeDtypeStruct((batch, tokens, h, width), dtype, sharding=sharding)
  loss = lambda q, k, v: causal_attention(q, k, v, impl="pallas").astype(jnp.float32).sum()
  _, report = aot.compile_with_triton_report(
    jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))),
    spec(heads),
    spec(kv_heads),
    spec(kv_heads),
    devices=devices,
  )
  assert sorted(report) == ["causal_attention_backward", "causal_attention_forward"]
  for name, row in report.items():
    assert row["spill_store_bytes"] == 0 and row["spill_load_bytes"] == 0, (name, row)
    assert row["shared_memory_bytes"] <= SHARED_MEMORY_LIMIT, (name, row)
