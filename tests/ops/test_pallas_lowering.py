"""The Pallas kernels lower for their real targets, and (on a GPU or TPU) run there correctly.

No accelerator is needed to check the lowering: `jax.export` for the "cuda" and "tpu" platforms
runs Pallas' Triton and Mosaic lowerings on any host, which rejects primitives, block shapes and
layouts those backends do not support. What it cannot check (register pressure, Mosaic's own
compilation, speed) needs the hardware: the `gpu` and `tpu` tests below.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_jax.ops import gated_delta_rule
from sleep_jax.ops.gated_delta.pallas_gpu import gated_delta_rule_pallas_gpu
from sleep_jax.ops.gated_delta.pallas_gpu_staged import gated_delta_rule_pallas_gpu_staged
from sleep_jax.ops.gated_delta.pallas_tpu import gated_delta_rule_pallas_tpu

# Triton kernels are compiled for one GPU: the exported module is not meant to be portable.
_ALLOW_TRITON = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]


def _forward_and_backward(rule):
  def run(q, k, v, g, beta, initial_state):
    outputs, vjp = jax.vjp(
      lambda *args: rule(*args[:5], initial_state=args[5]), q, k, v, g, beta, initial_state
    )
    return outputs, vjp(outputs)

  return run


def _abstract_inputs(batch, tokens, heads, key_dim, value_dim, dtype):
  spec = jax.ShapeDtypeStruct
  return (
    spec((batch, tokens, heads, key_dim), dtype),
    spec((batch, tokens, heads, key_dim), dtype),
    spec((batch, tokens, heads, value_dim), dtype),
    spec((batch, tokens, heads), jnp.float32),
    spec((batch, tokens, heads), jnp.float32),
    spec((batch, heads, key_dim, value_dim), jnp.float32),
  )


# The benchmark's GPU shape (K = V = 128, bf16) at a T that is not a multiple of the chunk (and
# whose 5 chunks are not a power of two), and a small float32 shape whose K and V need padding
# (two chunks of 64: one chunk launches no state-walk kernel).
SHAPES = {
  "bf16 K=V=128 T=300": (2, 300, 2, 128, 128, jnp.bfloat16),
  "f32 K=8 V=24 T=70": (1, 70, 3, 8, 24, jnp.float32),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize(
  "platform,rule,custom_call",
  [
    ("cuda", gated_delta_rule_pallas_gpu, "__gpu$xla.gpu.triton"),
    ("cuda", gated_delta_rule_pallas_gpu_staged, "__gpu$xla.gpu.triton"),
    ("tpu", gated_delta_rule_pallas_tpu, "tpu_custom_call"),
  ],
)
def test_forward_and_backward_kernels_lower_for_their_platform(platform, rule, custom_call, shape):
  exported = jax.export.export(
    jax.jit(_forward_and_backward(rule)), platforms=[platform], disabled_checks=_ALLOW_TRITON
  )(*_abstract_inputs(*SHAPES[shape]))
  module = exported.mlir_module()
  assert module.count(custom_call) >= 2, "expected a forward and a backward kernel"


def test_auto_lowers_to_the_staged_kernels_for_gpus_and_the_fused_one_for_tpus():
  inputs = _abstract_inputs(*SHAPES["f32 K=8 V=24 T=70"])[:5]
  auto = jax.jit(functools.partial(gated_delta_rule, impl="auto", chunk_size=16))
  for platform, present, absent in [
    ("cuda", "gated_delta_state_walk", "gated_delta_forward"),
    ("tpu", "tpu_custom_call", "gated_delta_state_walk"),
  ]:
    module = jax.export.export(auto, platforms=[platform], disabled_checks=_ALLOW_TRITON)(
      *inputs
    ).mlir_module()
    assert present in module and absent not in module, platform


def _random_inputs(batch, tokens, heads, key_dim, value_dim, dtype):
  rng = np.random.default_rng(0)
  k = rng.normal(size=(batch, tokens, heads, key_dim))
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  return (
    jnp.asarray(rng.normal(size=(batch, tokens, heads, key_dim)), dtype),
    jnp.asarray(k, dtype),
    jnp.asarray(rng.normal(size=(batch, tokens, heads, value_dim)), dtype),
    jnp.asarray(-rng.uniform(0.01, 1.0, size=(batch, tokens, heads)), jnp.float32),
    jnp.asarray(rng.uniform(0.05, 0.95, size=(batch, tokens, heads)), jnp.float32),
    jnp.asarray(rng.normal(size=(batch, heads, key_dim, value_dim)), jnp.float32),
  )


def _max_relative_errors(fast, slow, inputs):
  """Largest |fast - slow| / max |slow| of each output and each of the six gradients."""
  names = ("out", "final_state", "dq", "dk", "dv", "dg", "dbeta", "d_initial_state")
  got_leaves = jax.tree.leaves(jax.jit(_forward_and_backward(fast))(*inputs))
  want_leaves = jax.tree.leaves(jax.jit(_forward_and_backward(slow))(*inputs))
  errors = {}
  for name, got, want in zip(names, got_leaves, want_leaves):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.isfinite(got).all(), name
    errors[name] = np.abs(got - want).max() / np.abs(want).max()
  return errors


# float32: the kernels' matmuls are HIGHEST (true float32), so only summation order differs.
# bfloat16: outputs and q/k/v gradients are rounded to 8 mantissa bits (0.4%), and the staged
# kernels run TF32 matmuls for bf16 inputs; 1% of the largest value covers both.
_GPU_TOLERANCE = {jnp.float32: 1e-3, jnp.bfloat16: 1e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["pallas", "pallas_staged"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_gpu_kernels_match_the_chunked_form_on_a_gpu(impl, dtype):
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU")
  # T = 1000: 16 chunks of 64, the last one padded; K = V = 128; a random initial state.
  inputs = _random_inputs(2, 1000, 4, 128, 128, dtype)
  errors = _max_relative_errors(
    functools.partial(gated_delta_rule, impl=impl),
    functools.partial(gated_delta_rule, impl="chunked"),
    inputs,
  )
  assert max(errors.values()) <= _GPU_TOLERANCE[dtype], errors


@pytest.mark.tpu
def test_tpu_kernels_match_the_chunked_form_on_a_tpu():
  if jax.default_backend() != "tpu":
    pytest.skip("needs a TPU")
  inputs = _random_inputs(2, 1000, 4, 128, 128, jnp.float32)
  errors = _max_relative_errors(
    functools.partial(gated_delta_rule, impl="pallas"),
    functools.partial(gated_delta_rule, impl="chunked"),
    inputs,
  )
  assert max(errors.values()) <= 1e-3, errors
